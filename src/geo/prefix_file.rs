//! Parser for `CIDR,REGION` prefix lists shaped like GeoIP CSV exports.
//!
//! Format, one entry per line:
//!
//! ```text
//! # comment; '#' anywhere starts a comment (CIDRs and region names never contain it)
//! network,region            <- optional header: first entry line whose first field is
//!                              "network" or "cidr" (any case)
//! 10.0.0.0/8,eu
//!   2001:db8::/32 , us      <- whitespace around fields is ignored; blank lines too
//! 192.0.2.0/24,ap,JP,extra  <- columns after the region are ignored, so exports that
//!                              carry country codes or ASNs can be fed in unchanged
//! 198.51.100.7,us           <- a bare address is a host route
//! ```
//!
//! CIDRs are strict (no host bits; see [`Cidr`]). Region names follow
//! [`validate_region_name`]. The same CIDR twice with the same region is accepted; with
//! different regions it is an error naming both lines. All errors are collected (the
//! first [`MAX_ERRORS`], then one "N more" entry) so an operator fixes a file in one go.

use std::fmt;
use std::net::IpAddr;

use super::cidr::{Cidr, CidrError};
use super::{validate_region_name, InvalidRegionName};

/// At most this many errors are reported individually.
pub const MAX_ERRORS: usize = 100;

/// One problem in a prefix file; displays as `FILE:LINE: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixError {
    /// The file name given to [`parse_prefixes`].
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub kind: PrefixErrorKind,
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.kind)
    }
}

impl std::error::Error for PrefixError {}

/// The reason part of a [`PrefixError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixErrorKind {
    /// The first column is not a valid CIDR.
    #[error("bad CIDR \"{text}\": {error}")]
    BadCidr {
        /// The field as written.
        text: String,
        /// Why it was rejected.
        error: CidrError,
    },
    /// Only one column.
    #[error("missing region (expected CIDR,REGION)")]
    MissingRegion,
    /// The second column is not a valid region name.
    #[error("bad region \"{text}\": {error}")]
    BadRegion {
        /// The field as written.
        text: String,
        /// Why it was rejected.
        error: InvalidRegionName,
    },
    /// The CIDR already appeared with another region.
    #[error("{cidr} is mapped to \"{region}\" here but to \"{first_region}\" on line {first_line}")]
    Conflict {
        /// The repeated prefix.
        cidr: Cidr,
        /// Region on this line.
        region: String,
        /// Line of the first occurrence.
        first_line: usize,
        /// Region on that line.
        first_region: String,
    },
    /// Errors beyond [`MAX_ERRORS`], counted from this line on.
    #[error("and {more} more errors from this line on")]
    More {
        /// How many were not listed.
        more: usize,
    },
}

/// Longest field quoted back in an error.
const MAX_SHOWN: usize = 64;

/// A field as quoted in an error: cut at [`MAX_SHOWN`] bytes, so a file of
/// garbage (one huge line) gives an error an operator can read, not the
/// garbage again.
fn shown(field: &str) -> String {
    if field.len() <= MAX_SHOWN {
        return field.to_owned();
    }
    let mut end = MAX_SHOWN;
    while !field.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &field[..end], field.len())
}

/// Parses a prefix list; `file` is only used in error messages.
///
/// Returns entries in file order (a repeated CIDR only once), or every error found in
/// line order (see the module docs).
pub fn parse_prefixes(text: &str, file: &str) -> Result<Vec<(Cidr, String)>, Vec<PrefixError>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // (cidr, region, line) in file order.
    let mut entries: Vec<(Cidr, &str, usize)> = Vec::new();
    let mut errors = Errors::default();
    let mut header_allowed = true;

    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        // Byte search: '#' is ASCII, and this is cheaper than a char pattern per line.
        let content = match raw.bytes().position(|b| b == b'#') {
            Some(i) => &raw[..i],
            None => raw,
        }
        .trim();
        if content.is_empty() {
            continue;
        }
        let mut fields = content.split(',').map(str::trim);
        let cidr_text = fields.next().unwrap_or_default();
        if std::mem::take(&mut header_allowed)
            && (cidr_text.eq_ignore_ascii_case("network") || cidr_text.eq_ignore_ascii_case("cidr"))
        {
            continue;
        }
        let cidr = cidr_text.parse::<Cidr>().map_err(|error| PrefixErrorKind::BadCidr {
            text: shown(cidr_text),
            error,
        });
        let region = match fields.next() {
            None => Err(PrefixErrorKind::MissingRegion),
            Some(r) => validate_region_name(r)
                .map(|()| r)
                .map_err(|error| PrefixErrorKind::BadRegion { text: shown(r), error }),
        };
        // Report both columns' problems on one line rather than only the first.
        match (cidr, region) {
            (Ok(c), Ok(r)) => entries.push((c, r, line)),
            (c, r) => {
                for kind in [c.err(), r.err()].into_iter().flatten() {
                    errors.push(line, kind);
                }
            }
        }
    }

    // Repeats: sort (CIDR, position) so each group of equal CIDRs starts with its first
    // occurrence. Sorting integers is cheaper than hashing 500k keys.
    let mut order: Vec<(u128, u16, u32)> = entries
        .iter()
        .enumerate()
        .map(|(i, (cidr, _, _))| {
            let (key, tag) = sort_key(cidr);
            (key, tag, to_u32(i))
        })
        .collect();
    order.sort_unstable();
    let mut keep = vec![true; entries.len()];
    // (later, first) positions of a CIDR repeated with another region.
    let mut conflicts: Vec<(usize, usize)> = Vec::new();
    let mut head: Option<usize> = None;
    for &(_, _, i) in &order {
        let i = i as usize;
        match head {
            Some(h) if entries[h].0 == entries[i].0 => {
                keep[i] = false;
                if entries[h].1 != entries[i].1 {
                    conflicts.push((i, h));
                }
            }
            _ => head = Some(i),
        }
    }
    // Positions are in file order, so sorting them puts the errors in line order.
    conflicts.sort_unstable();
    let mut later_errors = Errors::default();
    for (i, h) in conflicts {
        let ((cidr, region, line), (_, first_region, first_line)) = (entries[i], entries[h]);
        later_errors.push(
            line,
            PrefixErrorKind::Conflict {
                cidr,
                region: region.to_owned(),
                first_line,
                first_region: first_region.to_owned(),
            },
        );
    }
    errors.merge(later_errors);
    if let Some(list) = errors.finish(file) {
        return Err(list);
    }
    Ok(entries
        .into_iter()
        .zip(keep)
        .filter(|&(_, k)| k)
        .map(|((c, r, _), _)| (c, r.to_owned()))
        .collect())
}
/// Errors in line order, stored up to one past [`MAX_ERRORS`] (enough to know where
/// the unlisted ones start) and counted in full.
#[derive(Default)]
struct Errors {
    kept: Vec<(usize, PrefixErrorKind)>,
    total: usize,
}

impl Errors {
    /// Adds an error; lines must not decrease.
    fn push(&mut self, line: usize, kind: PrefixErrorKind) {
        self.total += 1;
        if self.kept.len() <= MAX_ERRORS {
            self.kept.push((line, kind));
        }
    }

    /// Merges another line-ordered list; on equal lines ours come first. The first
    /// MAX_ERRORS + 1 of the merge lie within the first MAX_ERRORS + 1 of each list.
    fn merge(&mut self, other: Errors) {
        self.total += other.total;
        let mut ours = std::mem::take(&mut self.kept).into_iter().peekable();
        let mut theirs = other.kept.into_iter().peekable();
        while self.kept.len() <= MAX_ERRORS {
            let take_ours = match (ours.peek(), theirs.peek()) {
                (Some(a), Some(b)) => a.0 <= b.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_ours { ours.next() } else { theirs.next() };
            self.kept.extend(next);
        }
    }

    /// The list to report (capped, with an "N more" entry), or `None` if there are none.
    fn finish(mut self, file: &str) -> Option<Vec<PrefixError>> {
        if self.total == 0 {
            return None;
        }
        if self.total > MAX_ERRORS {
            let line = self.kept[MAX_ERRORS].0;
            self.kept.truncate(MAX_ERRORS);
            self.kept.push((
                line,
                PrefixErrorKind::More {
                    more: self.total - MAX_ERRORS,
                },
            ));
        }
        Some(
            self.kept
                .into_iter()
                .map(|(line, kind)| PrefixError {
                    file: file.to_owned(),
                    line,
                    kind,
                })
                .collect(),
        )
    }
}

/// Integer sort key of a CIDR: address, then family and length. Sorting plain integers
/// is several times faster than comparing `IpAddr` enums.
fn sort_key(cidr: &Cidr) -> (u128, u16) {
    let len = u16::from(cidr.prefix_len());
    match cidr.addr() {
        IpAddr::V4(a) => (u128::from(u32::from(a)), len),
        IpAddr::V6(a) => (u128::from(a), 0x100 | len),
    }
}

/// Positions are stored as u32 to keep the sort small; a prefix file with 2^32 entries
/// would not fit in memory anyway.
fn to_u32(n: usize) -> u32 {
    u32::try_from(n).expect("fewer than 2^32 entries")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        parse_prefixes(text, "config/regions.csv")
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn parses_the_documented_shape() {
        let text = "\u{feff}# GeoIP export\n\
                    network,region,country\n\
                    \n\
                    10.0.0.0/8,eu\n  2001:db8::/32 , us \r\n\
                    192.0.2.0/24,ap,JP,extra # trailing comment\n\
                    198.51.100.7,us\n\
                    10.0.0.0/8,eu\n";
        let got = parse_prefixes(text, "f").unwrap();
        let want: Vec<(Cidr, String)> = [
            ("10.0.0.0/8", "eu"),
            ("2001:db8::/32", "us"),
            ("192.0.2.0/24", "ap"),
            ("198.51.100.7/32", "us"),
        ]
        .iter()
        .map(|(c, r)| (c.parse().unwrap(), (*r).to_owned()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn header_only_allowed_first() {
        assert_eq!(
            errs("10.0.0.0/8,eu\nnetwork,region\n"),
            vec!["config/regions.csv:2: bad CIDR \"network\": invalid IP address"]
        );
    }

    #[test]
    fn errors_have_file_line_and_reason() {
        let text = "10.0.0.0/8,eu\n\
                    10.0.0.300/8,eu\n\
                    10.1.0.0/8,us\n\
                    192.0.2.0/24\n\
                    192.0.2.0/24,EU\n\
                    bogus,\n\
                    10.0.0.0/8,us\n";
        assert_eq!(
            errs(text),
            vec![
                "config/regions.csv:2: bad CIDR \"10.0.0.300/8\": invalid IPv4 address",
                "config/regions.csv:3: bad CIDR \"10.1.0.0/8\": host bits set (did you mean 10.0.0.0/8?)",
                "config/regions.csv:4: missing region (expected CIDR,REGION)",
                "config/regions.csv:5: bad region \"EU\": contains 'E'; use lowercase letters, digits, '_' or '-'",
                "config/regions.csv:6: bad CIDR \"bogus\": invalid IP address",
                "config/regions.csv:6: bad region \"\": empty",
                "config/regions.csv:7: 10.0.0.0/8 is mapped to \"us\" here but to \"eu\" on line 1",
            ]
        );
    }

    #[test]
    fn repeats_are_reported_in_line_order_against_the_first_line() {
        let text = "192.0.2.0/24,eu\n\
                    10.0.0.0/8,eu\n\
                    10.0.0.0/8,us\n\
                    192.0.2.0/24,us\n\
                    10.0.0.0/8,ap\n\
                    10.0.0.0/8,eu\n\
                    2001:db8::/32,eu\n\
                    2001:db8::/32,eu\n";
        assert_eq!(
            errs(text),
            vec![
                "config/regions.csv:3: 10.0.0.0/8 is mapped to \"us\" here but to \"eu\" on line 2",
                "config/regions.csv:4: 192.0.2.0/24 is mapped to \"us\" here but to \"eu\" on line 1",
                "config/regions.csv:5: 10.0.0.0/8 is mapped to \"ap\" here but to \"eu\" on line 2",
            ]
        );
        // Same-region repeats are dropped from the output, first occurrence kept.
        let got = parse_prefixes("10.0.0.0/8,eu\n192.0.2.0/24,us\n10.0.0.0/8,eu\n", "f").unwrap();
        let names: Vec<_> = got.iter().map(|(c, r)| format!("{c} {r}")).collect();
        assert_eq!(names, vec!["10.0.0.0/8 eu", "192.0.2.0/24 us"]);
    }

    #[test]
    fn capped_list_merges_bad_lines_and_repeats_in_line_order() {
        // Lines alternate: a repeat conflict, then a bad CIDR.
        let mut text = String::from("10.0.0.0/8,eu\n");
        for _ in 0..80 {
            text.push_str("10.0.0.0/8,us\nbad,eu\n");
        }
        let e = errs(&text);
        assert_eq!(e.len(), MAX_ERRORS + 1);
        assert!(e[0].starts_with("config/regions.csv:2: 10.0.0.0/8"));
        assert!(e[1].starts_with("config/regions.csv:3: bad CIDR"));
        assert!(e[98].starts_with("config/regions.csv:100: 10.0.0.0/8"));
        assert!(e[99].starts_with("config/regions.csv:101: bad CIDR"));
        assert_eq!(e[100], "config/regions.csv:102: and 60 more errors from this line on");
    }

    #[test]
    fn error_list_is_capped() {
        let text: String = (0..250).map(|i| format!("bad{i},eu\n")).collect();
        let e = errs(&text);
        assert_eq!(e.len(), MAX_ERRORS + 1);
        assert_eq!(e[99], "config/regions.csv:100: bad CIDR \"bad99\": invalid IP address");
        assert_eq!(e[100], "config/regions.csv:101: and 150 more errors from this line on");
    }

    #[test]
    fn exactly_max_errors_has_no_summary() {
        let text: String = (0..MAX_ERRORS).map(|i| format!("x{i},eu\n")).collect();
        assert_eq!(errs(&text).len(), MAX_ERRORS);
    }

    #[test]
    fn empty_input_is_empty_list() {
        assert_eq!(parse_prefixes("", "f").unwrap(), vec![]);
        assert_eq!(parse_prefixes("# only\n\n", "f").unwrap(), vec![]);
    }

    #[test]
    fn a_huge_field_is_quoted_cut_short() {
        let text = format!("{},eu\n", "9".repeat(100_000));
        let errors = parse_prefixes(&text, "f.csv").unwrap_err();
        let shown = errors[0].to_string();
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.contains("... (100000 bytes)"), "{shown}");
    }
}
