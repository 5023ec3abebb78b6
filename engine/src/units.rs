//! Byte-size constants and the parsing and printing of sizes such as `64M` or `10G`.

use crate::{Error, Result};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

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

#[cfg(test)]
mod tests {
    use super::*;

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
