//! A hit (one page view) as the tracker sends it, checked field by field, and as the
//! outbox keeps it.
//!
//! The seed's payload: `{"site_id", "url", "context": [..], "user": {"id", "device"}}`,
//! or an array of them. Fields the seed does not name are ignored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use termopar_web::{ApiError, ErrorCode};

/// Longest `url`, in bytes (it is part of a rollup's key).
pub(crate) const MAX_URL_BYTES: usize = 2000;
/// Longest context, in characters.
pub(crate) const MAX_CONTEXT_CHARS: usize = 100;
/// Longest `user.id`, in characters.
pub(crate) const MAX_USER_ID_CHARS: usize = 128;
/// Longest `user.device`, in characters.
pub(crate) const MAX_DEVICE_CHARS: usize = 200;
/// Longest user agent kept, in bytes (longer ones are cut at a character boundary).
pub(crate) const MAX_USER_AGENT_BYTES: usize = 512;

/// Why a hit or a request was refused: the label it is counted under
/// (`tracking_rejected_total{reason}`) and the error answered.
#[derive(Debug, Clone)]
pub(crate) struct Reject {
    pub(crate) reason: &'static str,
    pub(crate) error: ApiError,
}

impl Reject {
    pub(crate) fn new(reason: &'static str, error: ApiError) -> Self {
        Self { reason, error }
    }

    fn field(reason: &'static str, field: &str, message: impl Into<String>) -> Self {
        Self::new(reason, ApiError::validation(field, message))
    }

    /// Counts it.
    pub(crate) fn count(&self, hits: usize) {
        metrics::counter!("tracking_rejected_total", "reason" => self.reason)
            .increment(hits as u64);
    }
}

/// A hit whose fields are all acceptable (its site is checked later).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hit {
    pub(crate) site_id: Uuid,
    pub(crate) url: String,
    /// Trimmed, without repeats, in the order sent.
    pub(crate) context: Vec<String>,
    pub(crate) user_id: String,
    pub(crate) device: Option<String>,
}

/// The hits of a body: each checked on its own, so that one bad hit of a batch does not
/// sink the others. The whole body is refused when it is not JSON, not an object or an
/// array of them, empty, or longer than `max_hits`.
pub(crate) fn parse_body(
    body: &[u8],
    max_hits: usize,
    max_contexts: usize,
) -> Result<Vec<Result<Hit, Reject>>, Reject> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Reject::new(
            "malformed",
            ApiError::bad_request(format!("the body is not JSON: {e}")),
        )
    })?;
    let items = match value {
        Value::Array(items) => items,
        one @ Value::Object(_) => vec![one],
        _ => {
            return Err(Reject::new(
                "malformed",
                ApiError::bad_request("the body must be a hit object or an array of them"),
            ))
        }
    };
    if items.is_empty() {
        return Err(Reject::new(
            "malformed",
            ApiError::bad_request("the array holds no hits"),
        ));
    }
    if items.len() > max_hits {
        return Err(Reject::new(
            "too_many_hits",
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("at most {max_hits} hits per request"),
            ),
        ));
    }
    Ok(items.iter().map(|v| parse_hit(v, max_contexts)).collect())
}

fn parse_hit(value: &Value, max_contexts: usize) -> Result<Hit, Reject> {
    let Value::Object(hit) = value else {
        return Err(Reject::new(
            "malformed",
            ApiError::bad_request("each hit must be a JSON object"),
        ));
    };
    let site_id = hit
        .get("site_id")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| Reject::field("invalid_site_id", "site_id", "site_id must be a UUID"))?;
    let url = hit
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| Reject::field("invalid_url", "url", "url is required"))?;
    let url = page_url(url)?;
    let context = contexts(hit.get("context"), max_contexts)?;
    let (user_id, device) = user(hit.get("user"))?;
    Ok(Hit {
        site_id,
        url,
        context,
        user_id,
        device,
    })
}

/// An absolute http(s) URL, as sent (only surrounding spaces removed).
fn page_url(url: &str) -> Result<String, Reject> {
    let bad = |message: &str| Reject::field("invalid_url", "url", message);
    let url = url.trim();
    if url.len() > MAX_URL_BYTES {
        return Err(bad(&format!("url is longer than {MAX_URL_BYTES} bytes")));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(&format!("url is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(bad("url must be an absolute http or https URL"));
    }
    Ok(url.to_owned())
}

fn contexts(value: Option<&Value>, max: usize) -> Result<Vec<String>, Reject> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(Reject::field(
                "invalid_context",
                "context",
                "context must be an array of strings",
            ))
        }
    };
    if items.len() > max {
        return Err(Reject::field(
            "too_many_contexts",
            "context",
            format!("at most {max} contexts per hit"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let c = item.as_str().map(str::trim).ok_or_else(|| {
            Reject::field(
                "invalid_context",
                "context",
                "context must be an array of strings",
            )
        })?;
        if c.is_empty() || c.chars().count() > MAX_CONTEXT_CHARS || c.chars().any(char::is_control)
        {
            return Err(Reject::field(
                "invalid_context",
                "context",
                format!("each context must be 1 to {MAX_CONTEXT_CHARS} printable characters"),
            ));
        }
        if !out.iter().any(|o| o == c) {
            out.push(c.to_owned());
        }
    }
    Ok(out)
}

fn user(value: Option<&Value>) -> Result<(String, Option<String>), Reject> {
    let Some(Value::Object(user)) = value else {
        return Err(Reject::field(
            "invalid_user",
            "user",
            "user must be an object with an id",
        ));
    };
    let printable = |s: &str, max: usize| {
        !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
    };
    let id = user
        .get("id")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|id| printable(id, MAX_USER_ID_CHARS))
        .ok_or_else(|| {
            Reject::field(
                "invalid_user",
                "user.id",
                format!("user.id must be 1 to {MAX_USER_ID_CHARS} printable characters"),
            )
        })?;
    let device = match user.get("device") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) if d.trim().is_empty() => None,
        Some(Value::String(d)) if printable(d.trim(), MAX_DEVICE_CHARS) => {
            Some(d.trim().to_owned())
        }
        Some(_) => {
            return Err(Reject::field(
                "invalid_user",
                "user.device",
                format!(
                "user.device must be a string of at most {MAX_DEVICE_CHARS} printable characters"
            ),
            ))
        }
    };
    Ok((id.to_owned(), device))
}

/// A hit as the outbox keeps it: with the time it was received and the user agent that
/// sent it (never the address it came from). Short keys: the outbox holds many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredHit {
    #[serde(rename = "s")]
    pub(crate) site_id: Uuid,
    /// Received at, milliseconds since the epoch (MongoDB's precision).
    #[serde(rename = "t")]
    pub(crate) at_ms: i64,
    #[serde(rename = "u")]
    pub(crate) url: String,
    #[serde(rename = "c", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) context: Vec<String>,
    #[serde(rename = "i")]
    pub(crate) user_id: String,
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    pub(crate) device: Option<String>,
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub(crate) user_agent: Option<String>,
}

impl StoredHit {
    pub(crate) fn new(hit: Hit, at: DateTime<Utc>, user_agent: Option<&str>) -> Self {
        Self {
            site_id: hit.site_id,
            at_ms: at.timestamp_millis(),
            url: hit.url,
            context: hit.context,
            user_id: hit.user_id,
            device: hit.device,
            user_agent: user_agent.map(|ua| cut(ua, MAX_USER_AGENT_BYTES).to_owned()),
        }
    }

    pub(crate) fn at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.at_ms).unwrap_or_default()
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SEED: &str = r#"{
        "site_id": "7a05f6b5-3285-42a8-83af-9067e29cb963",
        "url": "https://client.site.com/blog/same-page-accessed",
        "context": ["noticia", "culinaria", "vegano"],
        "user": {"id": "73e11ba9-a12c-4ab8-9648-e65e8d7c4d9e", "device": "Mozilla Firefox"}
    }"#;

    fn one(body: &Value) -> Result<Hit, Reject> {
        parse_body(body.to_string().as_bytes(), 100, 32)
            .expect("the body is acceptable")
            .remove(0)
    }

    #[test]
    fn the_seed_payload_is_a_hit() {
        let hit = one(&serde_json::from_str(SEED).unwrap()).expect("acceptable");
        assert_eq!(
            hit,
            Hit {
                site_id: "7a05f6b5-3285-42a8-83af-9067e29cb963".parse().unwrap(),
                url: "https://client.site.com/blog/same-page-accessed".into(),
                context: vec!["noticia".into(), "culinaria".into(), "vegano".into()],
                user_id: "73e11ba9-a12c-4ab8-9648-e65e8d7c4d9e".into(),
                device: Some("Mozilla Firefox".into()),
            }
        );
    }

    #[test]
    fn every_bad_field_is_refused_with_its_reason() {
        let seed: Value = serde_json::from_str(SEED).unwrap();
        let with = |path: &[&str], v: Value| {
            let mut hit = seed.clone();
            let mut at = &mut hit;
            for p in &path[..path.len() - 1] {
                at = at.get_mut(*p).unwrap();
            }
            at[path[path.len() - 1]] = v;
            hit
        };
        let too_many: Vec<String> = (0..33).map(|k| format!("c{k}")).collect();
        let cases = [
            (
                "site id not a uuid",
                with(&["site_id"], json!("site-1")),
                "invalid_site_id",
            ),
            (
                "site id a number",
                with(&["site_id"], json!(7)),
                "invalid_site_id",
            ),
            (
                "relative url",
                with(&["url"], json!("/blog/a")),
                "invalid_url",
            ),
            (
                "javascript url",
                with(&["url"], json!("javascript:alert(1)")),
                "invalid_url",
            ),
            (
                "ftp url",
                with(&["url"], json!("ftp://files.example.com/a")),
                "invalid_url",
            ),
            (
                "url too long",
                with(
                    &["url"],
                    json!(format!("https://a.example/{}", "x".repeat(MAX_URL_BYTES))),
                ),
                "invalid_url",
            ),
            (
                "context a string",
                with(&["context"], json!("noticia")),
                "invalid_context",
            ),
            (
                "context of numbers",
                with(&["context"], json!([1, 2])),
                "invalid_context",
            ),
            (
                "empty context",
                with(&["context"], json!(["  "])),
                "invalid_context",
            ),
            (
                "too many contexts",
                with(&["context"], json!(too_many)),
                "too_many_contexts",
            ),
            ("no user", with(&["user"], Value::Null), "invalid_user"),
            (
                "user without id",
                with(&["user"], json!({"device": "x"})),
                "invalid_user",
            ),
            (
                "user id too long",
                with(&["user", "id"], json!("u".repeat(129))),
                "invalid_user",
            ),
            (
                "device not a string",
                with(&["user", "device"], json!(5)),
                "invalid_user",
            ),
        ];
        for (what, body, reason) in cases {
            match one(&body) {
                Err(r) => assert_eq!(r.reason, reason, "{what}"),
                Ok(hit) => panic!("{what}: accepted {hit:?}"),
            }
        }
    }

    #[test]
    fn contexts_are_trimmed_and_repeats_dropped() {
        let hit = one(&json!({"site_id": Uuid::nil(), "url": "https://a.example/",
            "context": [" a", "b", "a "], "user": {"id": "u"}}))
        .expect("acceptable");
        assert_eq!(hit.context, ["a", "b"]);
        assert_eq!(hit.device, None);
    }

    #[test]
    fn a_body_that_is_not_hits_is_refused_whole() {
        for (what, body, reason) in [
            ("not json", "{", "malformed"),
            ("a number", "5", "malformed"),
            ("an empty array", "[]", "malformed"),
        ] {
            let r = parse_body(body.as_bytes(), 100, 32).expect_err(what);
            assert_eq!(r.reason, reason, "{what}");
        }
        let many = Value::Array(vec![serde_json::from_str(SEED).unwrap(); 3]).to_string();
        let r = parse_body(many.as_bytes(), 2, 32).expect_err("too many");
        assert_eq!(
            (r.reason, r.error.status().as_u16()),
            ("too_many_hits", 413)
        );
    }

    #[test]
    fn a_batch_keeps_its_good_hits_beside_a_bad_one() {
        let mut bad: Value = serde_json::from_str(SEED).unwrap();
        bad["url"] = json!("nope");
        let body = json!([serde_json::from_str::<Value>(SEED).unwrap(), bad]).to_string();
        let hits = parse_body(body.as_bytes(), 100, 32).expect("acceptable");
        assert!(hits[0].is_ok());
        assert_eq!(hits[1].as_ref().unwrap_err().reason, "invalid_url");
    }

    #[test]
    fn a_stored_hit_keeps_a_cut_user_agent_and_never_an_address() {
        let hit = one(&serde_json::from_str(SEED).unwrap()).unwrap();
        let ua = "é".repeat(400);
        let stored = StoredHit::new(hit, Utc::now(), Some(&ua));
        let ua = stored.user_agent.as_deref().unwrap();
        assert!(ua.len() <= MAX_USER_AGENT_BYTES && ua.chars().all(|c| c == 'é'));
        let json = serde_json::to_value(&stored).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        // No address among them: only what the hit said, its time and user agent.
        assert_eq!(keys, ["a", "c", "d", "i", "s", "t", "u"]);
    }
}
