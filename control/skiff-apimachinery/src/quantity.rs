//! Kubernetes resource quantities (`250m`, `64Mi`, `1.5G`, `1e3`) as numbers of base units.
//!
//! Hand-written: the crates that parse quantities pull in a whole client stack or are
//! unmaintained, and the grammar is a few lines (see docs/dependencies.md).

/// The value of quantity `s` in base units (cores, bytes).
pub fn parse(s: &str) -> Result<f64, String> {
    let bad = || format!("quantity {s:?} is not valid");
    let t = s.trim();
    let (sign, t) = match t.as_bytes().first() {
        Some(b'-') => (-1.0, &t[1..]),
        Some(b'+') => (1.0, &t[1..]),
        _ => (1.0, t),
    };
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(end);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    Ok(sign * n * mult)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn quantities() {
        assert_eq!(parse("250m").unwrap(), 0.25);
        assert_eq!(parse("2").unwrap(), 2.0);
        assert_eq!(parse("64Mi").unwrap(), 67_108_864.0);
        assert_eq!(parse("1G").unwrap(), 1e9);
        assert_eq!(parse("1.5Gi").unwrap(), 1.5 * 1024.0 * 1024.0 * 1024.0);
        assert_eq!(parse("1e3").unwrap(), 1000.0);
        assert_eq!(parse("100k").unwrap(), 100_000.0);
        for bad in ["", "m", "1x", "1.2.3", "Mi", "1e"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
