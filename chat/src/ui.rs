//! The chat product's web page.

use poem::{web::Html, Endpoint};

/// `GET /ui/conversations`: browse conversations and read their messages (log in as an
/// admin; the page calls the API with the token).
pub fn page() -> impl Endpoint {
    poem::endpoint::make_sync(|_| Html(include_str!("../static/conversations.html")))
}
