//! The chat product's web page.

use poem::{web::Html, Endpoint};

/// `GET /ui/conversations`: browse conversations and read their messages, linked from the
/// console (log in there as an admin; the page calls the API with the console's session).
pub fn page() -> impl Endpoint {
    poem::endpoint::make_sync(|_| Html(include_str!("../static/conversations.html")))
}
