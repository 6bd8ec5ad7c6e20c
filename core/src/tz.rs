//! IANA time zones.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// Parses an IANA zone name such as `America/Sao_Paulo` (exact spelling, as the
/// database lists it).
pub fn parse(name: &str) -> Option<Tz> {
    name.parse().ok()
}

/// The UTC instant a local day starts (the first valid local time of that date, for
/// zones whose DST change skips midnight).
pub fn local_day_start(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    let mut t = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    for _ in 0..16 {
        if let Some(start) = tz.from_local_datetime(&t).earliest() {
            return start.with_timezone(&Utc);
        }
        t += chrono::Duration::minutes(15);
    }
    tz.from_utc_datetime(&t).with_timezone(&Utc)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_zones_parse_and_made_up_ones_do_not() {
        for ok in ["UTC", "America/Sao_Paulo", "Asia/Kathmandu", "Asia/Kolkata"] {
            assert!(super::parse(ok).is_some(), "{ok}");
        }
        for bad in ["", "Mars/Olympus", "GMT+3 ", "america/sao paulo"] {
            assert!(super::parse(bad).is_none(), "{bad}");
        }
    }
}
