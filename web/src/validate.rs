//! Field checks shared by the resources of every product. Each failure is a 422 naming
//! the field.

use crate::{ApiError, ApiResult};

/// A required name: trimmed, 1 to `max` characters.
pub fn name(field: &str, value: &str, max: usize) -> ApiResult<String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ApiError::validation(
            field,
            format!("{field} must not be empty"),
        ));
    }
    text(field, trimmed, max)
}

/// Free text of at most `max` characters, without control characters.
pub fn text(field: &str, value: &str, max: usize) -> ApiResult<String> {
    if value.chars().count() > max {
        return Err(ApiError::validation(
            field,
            format!("{field} must be at most {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(ApiError::validation(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(value.to_owned())
}

/// An IANA time-zone name.
pub fn timezone(field: &str, value: &str) -> ApiResult<String> {
    match termopar_core::tz::parse(value.trim()) {
        Some(tz) => Ok(tz.name().to_owned()),
        None => Err(ApiError::validation(
            field,
            format!("{value:?} is not an IANA time zone such as America/Sao_Paulo"),
        )),
    }
}

/// A JSON object of at most `max_bytes` once serialized.
pub fn json_object(
    field: &str,
    value: serde_json::Value,
    max_bytes: usize,
) -> ApiResult<serde_json::Value> {
    if !value.is_object() {
        return Err(ApiError::validation(
            field,
            format!("{field} must be a JSON object"),
        ));
    }
    if value.to_string().len() > max_bytes {
        return Err(ApiError::validation(
            field,
            format!("{field} must be at most {max_bytes} bytes"),
        ));
    }
    Ok(value)
}

/// Checks an e-mail's shape (a full check is sending mail to it, which we do not).
pub fn email(email: &str) -> ApiResult<()> {
    let ok = (3..=254).contains(&email.chars().count())
        && !email.chars().any(char::is_whitespace)
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty());
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation("email", "not a valid e-mail address"))
    }
}

/// Checks a password's length.
pub fn password(password: &str) -> ApiResult<()> {
    if (8..=256).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(ApiError::validation(
            "password",
            "password must be 8 to 256 characters",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(
            name("name", "  Cold Storage  ", 200).unwrap(),
            "Cold Storage"
        );
        let cases = [
            ("empty", ""),
            ("blank", "   "),
            ("too long", &"x".repeat(201)),
            ("control", "a\u{0}b"),
        ];
        for (what, value) in cases {
            let err = name("name", value, 200).unwrap_err();
            assert_eq!(err.code().as_str(), "validation_failed", "{what}");
        }
    }

    #[test]
    fn timezones_must_be_iana_names() {
        assert_eq!(
            timezone("timezone", "Asia/Kathmandu").unwrap(),
            "Asia/Kathmandu"
        );
        assert!(timezone("timezone", "Nowhere/Town").is_err());
        assert!(timezone("timezone", "+05:45").is_err());
    }

    #[test]
    fn metadata_must_be_a_small_object() {
        assert!(json_object("metadata", serde_json::json!({"a": 1}), 100).is_ok());
        assert!(json_object("metadata", serde_json::json!([1]), 100).is_err());
        assert!(json_object("metadata", serde_json::json!({"a": "x".repeat(200)}), 100).is_err());
    }
}
