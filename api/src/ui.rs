//! Web pages served by the API.

use poem::{handler, web::Html};

/// `GET /ui/conversations`: browse conversations and read their messages (log in as an
/// admin; the page calls the API with the token).
#[handler]
pub fn conversations() -> Html<&'static str> {
    Html(include_str!("../static/conversations.html"))
}
