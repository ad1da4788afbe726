//! Human durations in config files: `"150ms"`, `"2s"`, `"5m"`, `"1h"`.

use std::time::Duration;

/// Parses a duration string: an unsigned integer followed by one unit
/// (`ms`, `s`, `m`, `h`). A unit is required so that `"30"` is never
/// silently read as seconds by one operator and milliseconds by another.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("\"{text}\" has no unit (use ms, s, m or h, e.g. \"2s\")"))?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("\"{text}\" does not start with a number (e.g. \"2s\")"));
    }
    let value: u64 = digits.parse().map_err(|_| format!("\"{text}\": number too large"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("\"{text}\": unknown unit \"{unit}\" (use ms, s, m or h)")),
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("\"{text}\": duration too large"))
}

/// Formats a duration the way the config accepts it back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("150ms"), Ok(Duration::from_millis(150)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration(" 1h "), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_bad_text() {
        for bad in ["", "30", "s", "2 s", "2sec", "-1s", "1.5s", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn format_round_trips() {
        for ms in [0u64, 1, 150, 1000, 2500, 60_000, 3_600_000, 7_200_000] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
