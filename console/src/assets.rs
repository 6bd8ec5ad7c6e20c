//! The console's scripts and styles, embedded in the binary (no build step, no CDN) and
//! served with a content hash in their URL, so browsers keep them until they change.

use std::sync::LazyLock;

use poem::{
    handler,
    http::{header, StatusCode},
    web::Path,
    Request, Response,
};
use sha2::{Digest, Sha256};

struct Asset {
    name: &'static str,
    bytes: &'static [u8],
    content_type: &'static str,
    /// The first hex digits of the content's SHA-256.
    version: String,
}

macro_rules! asset {
    ($name:literal, $content_type:literal) => {
        (
            $name,
            include_bytes!(concat!("../assets/", $name)).as_slice(),
            $content_type,
        )
    };
}

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    [
        asset!("console.css", "text/css; charset=utf-8"),
        asset!("console.js", "text/javascript; charset=utf-8"),
        asset!("charts.js", "text/javascript; charset=utf-8"),
        asset!("uplot.min.js", "text/javascript; charset=utf-8"),
        asset!("uplot.min.css", "text/css; charset=utf-8"),
    ]
    .into_iter()
    .map(|(name, bytes, content_type)| Asset {
        name,
        bytes,
        content_type,
        version: hex::encode(&Sha256::digest(bytes)[..6]),
    })
    .collect()
});

/// The URL of an embedded asset, with its version.
pub(crate) fn url(name: &str) -> String {
    let asset = ASSETS
        .iter()
        .find(|a| a.name == name)
        .unwrap_or_else(|| panic!("no embedded asset {name}"));
    format!("/ui/assets/{}?v={}", asset.name, asset.version)
}

/// `GET /ui/assets/{name}`.
#[handler]
#[tracing::instrument(skip_all)]
pub(crate) fn serve(req: &Request, Path(name): Path<String>) -> poem::Result<Response> {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return Err(termopar_web::error::ApiError::not_found("asset").into());
    };
    let etag = format!("\"{}\"", asset.version);
    let cache = if req.uri().query() == Some(&format!("v={}", asset.version)) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let builder = Response::builder()
        .header(header::ETAG, etag.as_str())
        .header(header::CACHE_CONTROL, cache)
        .header("x-content-type-options", "nosniff");
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return Ok(builder.status(StatusCode::NOT_MODIFIED).finish());
    }
    Ok(builder.content_type(asset.content_type).body(asset.bytes))
}
