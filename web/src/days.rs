//! Query parameters of per-day answers: a time zone and a range of local days.

use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;

use crate::{ApiError, ApiResult};

/// Most days one request may ask for.
pub const MAX_DAYS: i64 = 1000;
/// Days answered when `from` is not given: the last 30 up to `to`.
pub const DEFAULT_DAYS: i64 = 30;

/// The `tz` parameter: an IANA zone, or `None` when not given (400 when not a zone).
pub fn timezone(tz: Option<&str>) -> ApiResult<Option<Tz>> {
    tz.map(|name| {
        termopar_core::tz::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!("{name:?} is not an IANA time zone")).with_field("tz")
        })
    })
    .transpose()
}

/// The local days `from..=to` (inclusive) in `tz`: `to` defaults to today there, `from`
/// to [`DEFAULT_DAYS`] days before it; at most [`MAX_DAYS`] days.
pub fn range(
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    tz: Tz,
) -> ApiResult<(NaiveDate, NaiveDate)> {
    let to = to.unwrap_or_else(|| Utc::now().with_timezone(&tz).date_naive());
    let from = from.unwrap_or(to - chrono::Days::new(DEFAULT_DAYS as u64 - 1));
    if from > to {
        return Err(ApiError::bad_request("`from` is after `to`").with_field("from"));
    }
    if (to - from).num_days() >= MAX_DAYS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_DAYS} days per request; narrow `from`..`to`"
        ))
        .with_field("to"));
    }
    Ok((from, to))
}
