//! Human units in the config file: sizes (`8 GiB`, `500MB`, `4096`) and durations (`30s`, `5m`,
//! `14d`, `250ms`). Parse errors say what was expected; the caller adds the key and file.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a size or duration in the config (or on the command line) is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("`{0}` is not a size (examples: 4096, 512 MiB, 8GiB)")]
    NotASize(String),
    #[error("unknown size unit `{unit}` in `{text}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")]
    SizeUnit { unit: String, text: String },
    #[error("`{0}` is not a duration (examples: 250ms, 30s, 5m, 2h, 14d)")]
    NotADuration(String),
    #[error("`{0}` needs a unit (ms, s, m, h, d)")]
    NoDurationUnit(String),
    #[error("unknown duration unit `{unit}` in `{text}` (use ms, s, m, h, d)")]
    DurationUnit { unit: String, text: String },
    #[error("`{0}` is not a rate (examples: 0, 2 MiB/s, 20 Mbit/s, 500 KB/s)")]
    NotARate(String),
    #[error(
        "unknown rate unit `{unit}` in `{text}` (use B/s, KiB/s, MiB/s, GiB/s, KB/s, MB/s, GB/s, kbit/s, Mbit/s, Gbit/s)"
    )]
    RateUnit { unit: String, text: String },
    #[error("`{0}` is ambiguous: write Mbit/s (megabits) or MB/s (megabytes)")]
    AmbiguousRate(String),
    #[error("`{0}` is out of range")]
    OutOfRange(String),
}

/// A size in bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub struct ByteSize(pub u64);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| UnitError::NotASize(text.into()))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => KIB,
            "m" | "mb" => 1000 * 1000,
            "mib" => MIB,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => GIB,
            "t" | "tb" => 1000 * 1000 * 1000 * 1000,
            "tib" => 1024 * GIB,
            other => {
                return Err(UnitError::SizeUnit {
                    unit: other.into(),
                    text: text.into(),
                });
            }
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(UnitError::OutOfRange(text.into()));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [
            ("TiB", 1024 * GIB),
            ("GiB", GIB),
            ("MiB", MIB),
            ("KiB", KIB),
        ] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{} {unit}", b / size);
            }
        }
        if b >= GIB {
            write!(f, "{:.1} GiB", b as f64 / GIB as f64)
        } else if b >= MIB {
            write!(f, "{:.1} MiB", b as f64 / MIB as f64)
        } else {
            write!(f, "{b} B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, ByteSize, ByteSize::parse)
    }
}

/// A config value written as a bare number or as text with a unit.
fn number_or_text<'de, D: Deserializer<'de>, T>(
    d: D,
    number: fn(u64) -> T,
    text: fn(&str) -> Result<T, UnitError>,
) -> Result<T, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(number(n)),
        Raw::Text(t) => text(&t).map_err(serde::de::Error::custom),
    }
}

/// A duration written with a unit.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub struct Span(pub Duration);

impl Span {
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| UnitError::NotADuration(text.into()))?;
        let ms: u64 = match unit.trim() {
            "ms" => 1,
            "s" => 1000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(UnitError::NoDurationUnit(text.into())),
            other => {
                return Err(UnitError::DurationUnit {
                    unit: other.into(),
                    text: text.into(),
                });
            }
        };
        let total = n
            .checked_mul(ms)
            .ok_or_else(|| UnitError::OutOfRange(text.into()))?;
        Ok(Span(Duration::from_millis(total)))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::fsm::diagram::format_period(self.0))
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Span::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A transfer rate in bytes per second; 0 means unlimited.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub struct Rate(pub u64);

impl Rate {
    pub const UNLIMITED: Rate = Rate(0);

    /// `"2 MiB/s"`, `"20 Mbit/s"`, `"500 KB/s"`, `"0"`; a bare number is bytes per second.
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let t = text.trim();
        let lower = t.to_ascii_lowercase();
        if lower == "0" || lower == "unlimited" {
            return Ok(Rate::UNLIMITED);
        }
        // "Mb/s" means megabits to an ISP and megabytes to many people: said in full instead.
        let written_unit = t.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        let written_unit = written_unit.trim().trim_end_matches("/s");
        if ["kb", "Kb", "mb", "Mb", "gb", "Gb"].contains(&written_unit) {
            return Err(UnitError::AmbiguousRate(text.into()));
        }
        // `Mbps` and friends are bits, as on an ISP's bill.
        let lower = match lower.strip_suffix("bps") {
            Some(prefix) => format!("{prefix}bit/s"),
            None => lower,
        };
        let per_second = lower.strip_suffix("/s").unwrap_or(&lower);
        let split = per_second
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(per_second.len());
        let (number, unit) = per_second.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| UnitError::NotARate(text.into()))?;
        let multiplier: f64 = match unit.trim() {
            "" | "b" => 1.0,
            "kib" => KIB as f64,
            "mib" => MIB as f64,
            "gib" => GIB as f64,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "bit" => 1.0 / 8.0,
            "kbit" => 1e3 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gbit" => 1e9 / 8.0,
            other => {
                return Err(UnitError::RateUnit {
                    unit: other.into(),
                    text: text.into(),
                });
            }
        };
        let bytes = number * multiplier;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(UnitError::OutOfRange(text.into()));
        }
        // A non-zero rate that rounds to nothing would read as unlimited.
        Ok(Rate((bytes.round() as u64).max(u64::from(bytes > 0.0))))
    }

    pub fn is_unlimited(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Exact, so that a rate written back to a config file reads the same.
        let b = self.0;
        for (unit, size) in [
            ("GiB", GIB),
            ("MiB", MIB),
            ("KiB", KIB),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("KB", 1_000),
        ] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{} {unit}/s", b / size);
            }
        }
        if self.is_unlimited() {
            return f.write_str("0");
        }
        write!(f, "{b} B/s")
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, Rate, Rate::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert_eq!(ByteSize::parse("8 GiB"), Ok(ByteSize(8 * GIB)));
        assert_eq!(ByteSize::parse("1.5MiB"), Ok(ByteSize(3 * MIB / 2)));
        assert_eq!(ByteSize::parse("2 GB"), Ok(ByteSize(2_000_000_000)));
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("3 parsecs").is_err());
        assert_eq!(ByteSize(8 * GIB).to_string(), "8 GiB");
        assert_eq!(
            ByteSize::parse(&ByteSize(123_456_789).to_string()).map(|b| b.0 / MIB),
            Ok(117)
        );
    }

    #[test]
    fn rates() {
        assert_eq!(Rate::parse("0"), Ok(Rate::UNLIMITED));
        assert_eq!(Rate::parse("2 MiB/s"), Ok(Rate(2 * MIB)));
        assert_eq!(Rate::parse("20 Mbit/s"), Ok(Rate(2_500_000)));
        assert_eq!(Rate::parse("20Mbps"), Ok(Rate(2_500_000)));
        assert_eq!(Rate::parse("500 KB/s"), Ok(Rate(500_000)));
        assert_eq!(Rate::parse("1.5 KiB/s"), Ok(Rate(1536)));
        assert_eq!(Rate::parse("4096"), Ok(Rate(4096)));
        assert_eq!(
            Rate::parse("0.1 bit/s"),
            Ok(Rate(1)),
            "a tiny rate is not unlimited"
        );
        assert!(matches!(Rate::parse("fast"), Err(UnitError::NotARate(_))));
        for ambiguous in ["20 Mb/s", "20mb/s", "100 kb/s", "1 Gb/s"] {
            assert!(
                matches!(Rate::parse(ambiguous), Err(UnitError::AmbiguousRate(_))),
                "{ambiguous}"
            );
        }
        assert_eq!(Rate::parse("2 MB/s"), Ok(Rate(2_000_000)));
        assert_eq!(Rate::parse("8 kB/s"), Ok(Rate(8_000)));
        assert!(matches!(
            Rate::parse("3 furlongs/s"),
            Err(UnitError::RateUnit { .. })
        ));
        assert_eq!(Rate(2 * MIB).to_string(), "2 MiB/s");
        assert_eq!(Rate::parse(&Rate(2 * MIB).to_string()), Ok(Rate(2 * MIB)));
        assert_eq!(Rate::UNLIMITED.to_string(), "0");
        for rate in [Rate(2_500_000), Rate(1536), Rate(123_457), Rate(3 * GIB)] {
            assert_eq!(Rate::parse(&rate.to_string()), Ok(rate), "{rate}");
        }
    }

    #[test]
    fn spans() {
        assert_eq!(Span::parse("30s"), Ok(Span(Duration::from_secs(30))));
        assert_eq!(Span::parse("250ms"), Ok(Span(Duration::from_millis(250))));
        assert_eq!(
            Span::parse("14d"),
            Ok(Span(Duration::from_secs(14 * 86400)))
        );
        assert!(Span::parse("30").is_err());
        assert!(Span::parse("soon").is_err());
        assert!(Span::parse("5 fortnights").is_err());
        assert_eq!(
            Span::parse("5m").map(|s| s.to_string()),
            Ok("5m".to_string())
        );
    }
}
