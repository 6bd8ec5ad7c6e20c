//! IANA time zones.

use chrono_tz::Tz;

/// Parses an IANA zone name such as `America/Sao_Paulo` (exact spelling, as the
/// database lists it).
pub fn parse(name: &str) -> Option<Tz> {
    name.parse().ok()
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
