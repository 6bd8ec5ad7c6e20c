//! What a simulated sensor measures.

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// The temperature behaviour of one sensor.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Kind, used for the sensor's name (`freezer`, `cold-room`, ...).
    pub kind: &'static str,
    /// Daily mean, °C.
    pub mean: f64,
    /// Half the daily swing, °C (warmest mid-afternoon local time).
    pub amplitude: f64,
    /// Standard deviation of the noise, °C.
    pub noise: f64,
    /// Chance that a reading is a spike (a door left open, a defrost cycle).
    pub spike_chance: f64,
    /// Size of a spike, °C.
    pub spike: f64,
    /// The site's time zone (the daily cycle follows local time).
    pub tz: Tz,
}

impl Profile {
    /// Profiles of a cold-storage company.
    pub fn cold_storage(tz: Tz) -> Vec<Profile> {
        vec![
            Profile {
                kind: "freezer",
                mean: -20.0,
                amplitude: 0.8,
                noise: 0.3,
                spike_chance: 0.004,
                spike: 9.0,
                tz,
            },
            Profile {
                kind: "chiller",
                mean: 3.0,
                amplitude: 0.6,
                noise: 0.2,
                spike_chance: 0.004,
                spike: 5.0,
                tz,
            },
            Profile {
                kind: "loading-dock",
                mean: 18.0,
                amplitude: 5.0,
                noise: 0.8,
                spike_chance: 0.002,
                spike: 6.0,
                tz,
            },
        ]
    }

    /// Profiles of a pharmaceutical warehouse.
    pub fn pharma(tz: Tz) -> Vec<Profile> {
        vec![
            Profile {
                kind: "vaccine-fridge",
                mean: 5.0,
                amplitude: 0.4,
                noise: 0.15,
                spike_chance: 0.003,
                spike: 4.0,
                tz,
            },
            Profile {
                kind: "warehouse",
                mean: 21.0,
                amplitude: 2.5,
                noise: 0.4,
                spike_chance: 0.001,
                spike: 5.0,
                tz,
            },
            Profile {
                kind: "cold-room",
                mean: 4.0,
                amplitude: 0.5,
                noise: 0.2,
                spike_chance: 0.003,
                spike: 4.0,
                tz,
            },
        ]
    }

    /// A reading at `t`.
    pub fn sample(&self, t: DateTime<Utc>, rng: &mut impl Rng) -> f64 {
        let local = t.with_timezone(&self.tz);
        let hour = f64::from(local.hour()) + f64::from(local.minute()) / 60.0;
        // Coolest around 03:00, warmest around 15:00.
        let cycle = self.amplitude * (std::f64::consts::TAU * (hour - 9.0) / 24.0).sin();
        let noise = Normal::new(0.0, self.noise)
            .expect("a positive deviation")
            .sample(rng);
        let spike = if rng.gen_bool(self.spike_chance) {
            self.spike * rng.gen_range(0.5..1.5)
        } else {
            0.0
        };
        ((self.mean + cycle + noise + spike) * 100.0).round() / 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn readings_follow_the_daily_cycle_around_the_mean() {
        let p = Profile {
            spike_chance: 0.0,
            noise: 0.01,
            ..Profile::cold_storage(chrono_tz::UTC)[2].clone()
        };
        let mut rng = StdRng::seed_from_u64(7);
        let at = |h| Utc.with_ymd_and_hms(2026, 1, 10, h, 0, 0).unwrap();
        let afternoon = p.sample(at(15), &mut rng);
        let night = p.sample(at(3), &mut rng);
        assert!(afternoon > p.mean + p.amplitude * 0.9, "{afternoon}");
        assert!(night < p.mean - p.amplitude * 0.9, "{night}");
    }
}
