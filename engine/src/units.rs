//! Byte-size constants and the parsing and printing of sizes such as `64M` or `10G`.

use crate::{Error, Result};

pub(crate) const KIB: u64 = 1 << 10;
pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;
pub(crate) const TIB: u64 = 1 << 40;

/// Parses `512K`, `64M`, `10G`, `1T` (binary multiples; an optional `iB` or `B` after the unit)
/// or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let invalid = |reason: &str| Error::InvalidArgument {
        what: "size",
        reason: format!("{text:?}: {reason} (examples: 512K, 64M, 10G, 1T, 4096)"),
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid("expected a whole number"));
    }
    let number: u64 = digits.parse().map_err(|_| invalid("number too large"))?;
    let multiplier = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => KIB,
        "M" | "MB" | "MIB" => MIB,
        "G" | "GB" | "GIB" => GIB,
        "T" | "TB" | "TIB" => TIB,
        _ => return Err(invalid("unknown unit")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| invalid("number too large"))
}

/// Prints a size with the largest binary unit that keeps it readable: `64 MiB`, `1.5 GiB`, `100 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit {
            return if bytes.is_multiple_of(unit) {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{:.2} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// Splits `12ms` into the number and the unit.
fn number_and_unit(text: &str) -> Option<(u64, String)> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    Some((digits.parse().ok()?, unit.trim().to_ascii_lowercase()))
}

/// Parses a duration: `30s`, `5m`, `15m`, `2h`, `500ms`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration> {
    let invalid = || Error::InvalidArgument {
        what: "duration",
        reason: format!("{text:?} (examples: 30s, 5m, 15m, 1h, 500ms)"),
    };
    let (number, unit) = number_and_unit(text).ok_or_else(invalid)?;
    let milliseconds = match unit.as_str() {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1000),
        "m" | "min" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => None,
    }
    .filter(|&milliseconds| milliseconds > 0)
    .ok_or_else(invalid)?;
    Ok(std::time::Duration::from_millis(milliseconds))
}

/// Parses a rate into bytes per second: bits with `kbit`, `Mbit`, `Gbit` (decimal, as links
/// are sold), bytes with `K`, `M`, `G` (binary, as the rest of blockrep), or plain bytes.
pub fn parse_rate(text: &str) -> Result<u64> {
    let invalid = || Error::InvalidArgument {
        what: "rate",
        reason: format!("{text:?} (examples: 100Mbit, 1Gbit, 50M for 50 MiB/s)"),
    };
    let (number, unit) = number_and_unit(text).ok_or_else(invalid)?;
    let unit = unit.trim_end_matches("/s").trim_end_matches("ps");
    let bytes = match unit {
        "kbit" => number.checked_mul(1000 / 8),
        "mbit" => number.checked_mul(1_000_000 / 8),
        "gbit" => number.checked_mul(1_000_000_000 / 8),
        "" | "b" => Some(number),
        "k" | "kib" => number.checked_mul(KIB),
        "m" | "mib" => number.checked_mul(MIB),
        "g" | "gib" => number.checked_mul(GIB),
        _ => None,
    }
    .filter(|&bytes| bytes > 0)
    .ok_or_else(invalid)?;
    Ok(bytes)
}

/// A daily window of local time, such as `22:00-06:00` (it may wrap past midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// Minutes after local midnight.
    start: u32,
    end: u32,
}

impl TimeWindow {
    /// Parses `HH:MM-HH:MM`.
    pub fn parse(text: &str) -> Result<TimeWindow> {
        let invalid = || Error::InvalidArgument {
            what: "time window",
            reason: format!("{text:?} (expected HH:MM-HH:MM, for example 22:00-06:00)"),
        };
        let minute = |part: &str| -> Option<u32> {
            let (hours, minutes) = part.trim().split_once(':')?;
            let (hours, minutes): (u32, u32) = (hours.parse().ok()?, minutes.parse().ok()?);
            (hours < 24 && minutes < 60).then_some(hours * 60 + minutes)
        };
        let (start, end) = text.split_once('-').ok_or_else(invalid)?;
        let (start, end) = (
            minute(start).ok_or_else(invalid)?,
            minute(end).ok_or_else(invalid)?,
        );
        if start == end {
            return Err(invalid());
        }
        Ok(TimeWindow { start, end })
    }

    /// Whether `minute` (after local midnight) falls inside the window.
    fn contains_minute(&self, minute: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    /// Whether the local time now falls inside the window.
    pub(crate) fn contains_now(&self) -> bool {
        self.contains_minute(local_minute_now())
    }
}

impl std::fmt::Display for TimeWindow {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

/// Minutes after local midnight, now.
fn local_minute_now() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as libc::time_t);
    // SAFETY: localtime_r writes only into `parts`, which lives through the call.
    let mut parts: libc::tm = unsafe { std::mem::zeroed() };
    let converted = unsafe { libc::localtime_r(&now, &mut parts) };
    if converted.is_null() {
        // No local time zone: UTC.
        return ((now / 60) % (24 * 60)) as u32;
    }
    (parts.tm_hour * 60 + parts.tm_min) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_windows_parse_and_wrap_past_midnight() {
        let night = TimeWindow::parse("22:00-06:00").unwrap();
        assert_eq!(night.to_string(), "22:00-06:00");
        assert!(night.contains_minute(23 * 60));
        assert!(night.contains_minute(5 * 60 + 59));
        assert!(!night.contains_minute(6 * 60));
        assert!(!night.contains_minute(12 * 60));
        let day = TimeWindow::parse("09:30-17:00").unwrap();
        assert!(day.contains_minute(9 * 60 + 30) && !day.contains_minute(17 * 60));
        for bad in [
            "22:00",
            "25:00-01:00",
            "10:00-10:00",
            "ten-six",
            "10:60-11:00",
        ] {
            assert!(TimeWindow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_take_the_usual_units() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        for bad in ["", "0s", "5 parsecs", "-1m", "1.5m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_take_bits_or_bytes() {
        assert_eq!(parse_rate("100Mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("50M").unwrap(), 50 * MIB);
        assert_eq!(parse_rate("4096").unwrap(), 4096);
        for bad in ["", "0", "fast", "10Tbit"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_with_units_are_binary_multiples() {
        assert_eq!(parse_size("512K").unwrap(), 512 * KIB);
        assert_eq!(parse_size("64M").unwrap(), 64 * MIB);
        assert_eq!(parse_size("10G").unwrap(), 10 * GIB);
        assert_eq!(parse_size("1t").unwrap(), TIB);
        assert_eq!(parse_size("2MiB").unwrap(), 2 * MIB);
        assert_eq!(parse_size("4096").unwrap(), 4096);
    }

    #[test]
    fn malformed_sizes_are_rejected_with_the_text_in_the_message() {
        for bad in [
            "",
            "M",
            "1.5G",
            "-1",
            "12Q",
            "99999999999999999999",
            "20000000T",
        ] {
            let message = parse_size(bad).unwrap_err().to_string();
            assert!(message.contains("invalid size"), "{bad}: {message}");
        }
    }

    #[test]
    fn sizes_print_in_the_largest_unit() {
        assert_eq!(format_size(64 * MIB), "64 MiB");
        assert_eq!(format_size(3 * GIB / 2), "1.50 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
