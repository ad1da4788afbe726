//! Geographic weighting: client address → region, and per-region spill-over weights.
//!
//! The pieces are pure and independent of I/O: [`parse_prefixes`] reads a `CIDR,REGION`
//! list, [`RegionNames`] interns region names to [`RegionId`]s, [`RegionMap`] resolves a
//! client address to its region by longest-prefix match, and [`effective_weights`] turns
//! a pool's backends, their health and a client region's multipliers into the weights of
//! that (pool, client region) Maglev table.

pub mod cidr;
pub mod policy;
pub mod prefix_file;
pub mod region_map;

use std::collections::HashMap;

pub use cidr::{Cidr, CidrError};
pub use policy::{effective_weights, GeoBackend, InvalidSpillThreshold, SpillThreshold, SHARE_SCALE};
pub use prefix_file::{parse_prefixes, PrefixError, PrefixErrorKind, MAX_ERRORS};
pub use region_map::{RegionId, RegionMap, RegionMapError};

/// Longest accepted region name, in bytes.
pub const MAX_REGION_NAME_LEN: usize = 64;

/// Why a region name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRegionName {
    /// Zero-length name.
    #[error("empty")]
    Empty,
    /// More than [`MAX_REGION_NAME_LEN`] bytes.
    #[error("longer than {MAX_REGION_NAME_LEN} characters")]
    TooLong,
    /// A character outside `[a-z0-9_-]`.
    #[error("contains {0:?}; use lowercase letters, digits, '_' or '-'")]
    BadChar(char),
}

/// Checks that `name` is 1–64 characters of `[a-z0-9_-]`.
///
/// Lowercase only, so that "EU" and "eu" cannot silently become two regions; names
/// appear in metrics labels and config keys, hence the conservative alphabet.
pub fn validate_region_name(name: &str) -> Result<(), InvalidRegionName> {
    if name.is_empty() {
        return Err(InvalidRegionName::Empty);
    }
    if let Some(c) = name.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-')) {
        return Err(InvalidRegionName::BadChar(c));
    }
    if name.len() > MAX_REGION_NAME_LEN {
        return Err(InvalidRegionName::TooLong);
    }
    Ok(())
}

/// Why a name could not be interned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionNameError {
    /// The name is not valid.
    #[error("bad region name \"{name}\": {error}")]
    Invalid {
        /// The name as given.
        name: String,
        /// Why.
        error: InvalidRegionName,
    },
    /// All 65,536 ids are taken.
    #[error("too many regions (max 65536)")]
    TooMany,
}

/// Interned region names ↔ [`RegionId`]s; "default" is always present as id 0.
///
/// Ids are dense and assigned in interning order, so interning in a fixed order (e.g.
/// config order) gives the same ids on every run.
#[derive(Debug, Clone)]
pub struct RegionNames {
    names: Vec<String>,
    ids: HashMap<String, RegionId>,
}

// === impl RegionNames ===

impl RegionNames {
    /// The id of the default region.
    pub const DEFAULT: RegionId = RegionId(0);
    /// The name of the default region.
    pub const DEFAULT_NAME: &'static str = "default";

    /// A table holding only "default".
    pub fn new() -> Self {
        let mut ids = HashMap::new();
        ids.insert(Self::DEFAULT_NAME.to_owned(), Self::DEFAULT);
        RegionNames {
            names: vec![Self::DEFAULT_NAME.to_owned()],
            ids,
        }
    }

    /// The id of `name`, assigning the next free one if it is new.
    pub fn intern(&mut self, name: &str) -> Result<RegionId, RegionNameError> {
        if let Some(&id) = self.ids.get(name) {
            return Ok(id);
        }
        validate_region_name(name).map_err(|error| RegionNameError::Invalid {
            name: name.to_owned(),
            error,
        })?;
        let id = u16::try_from(self.names.len()).map_err(|_| RegionNameError::TooMany)?;
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), RegionId(id));
        Ok(RegionId(id))
    }

    /// The id of an already interned name.
    pub fn id(&self, name: &str) -> Option<RegionId> {
        self.ids.get(name).copied()
    }

    /// The name of an id, if it was assigned.
    pub fn name(&self, id: RegionId) -> Option<&str> {
        self.names.get(usize::from(id.0)).map(String::as_str)
    }

    /// Number of regions, "default" included (so at least 1).
    pub fn count(&self) -> usize {
        self.names.len()
    }

    /// All (id, name) pairs in id order.
    pub fn iter(&self) -> impl Iterator<Item = (RegionId, &str)> + '_ {
        // names.len() <= 65536, so every index fits in a u16.
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (RegionId(i as u16), n.as_str()))
    }
}

impl Default for RegionNames {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_id_zero_and_ids_are_dense() {
        let mut n = RegionNames::new();
        assert_eq!(n.id("default"), Some(RegionId(0)));
        assert_eq!(n.intern("default").unwrap(), RegionId(0));
        assert_eq!(n.intern("eu").unwrap(), RegionId(1));
        assert_eq!(n.intern("us-east_1").unwrap(), RegionId(2));
        assert_eq!(n.intern("eu").unwrap(), RegionId(1));
        assert_eq!(n.name(RegionId(2)), Some("us-east_1"));
        assert_eq!(n.name(RegionId(3)), None);
        assert_eq!(n.count(), 3);
        let all: Vec<_> = n.iter().collect();
        assert_eq!(
            all,
            vec![
                (RegionId(0), "default"),
                (RegionId(1), "eu"),
                (RegionId(2), "us-east_1")
            ]
        );
    }

    #[test]
    fn names_are_validated() {
        let mut n = RegionNames::new();
        assert_eq!(
            n.intern("EU").unwrap_err().to_string(),
            "bad region name \"EU\": contains 'E'; use lowercase letters, digits, '_' or '-'"
        );
        assert_eq!(validate_region_name(""), Err(InvalidRegionName::Empty));
        assert_eq!(validate_region_name(&"a".repeat(64)), Ok(()));
        assert_eq!(validate_region_name(&"a".repeat(65)), Err(InvalidRegionName::TooLong));
        assert_eq!(validate_region_name("eu west"), Err(InvalidRegionName::BadChar(' ')));
        assert_eq!(validate_region_name("é"), Err(InvalidRegionName::BadChar('é')));
    }

    #[test]
    fn runs_out_of_ids_at_65536() {
        let mut n = RegionNames::new();
        for i in 1..65536u32 {
            assert_eq!(n.intern(&format!("r{i}")).unwrap(), RegionId(i as u16));
        }
        assert_eq!(n.intern("one-more"), Err(RegionNameError::TooMany));
    }

    #[test]
    fn pieces_fit_together() {
        let text = "10.0.0.0/8,eu\n10.1.0.0/16,us\n2001:db8::/32,eu\n";
        let mut names = RegionNames::new();
        let prefixes = parse_prefixes(text, "t").unwrap();
        let entries = prefixes
            .iter()
            .map(|(c, r)| Ok((*c, names.intern(r)?)))
            .collect::<Result<Vec<_>, RegionNameError>>()
            .unwrap();
        let map = RegionMap::new(entries, RegionNames::DEFAULT).unwrap();
        let region = |ip: &str| names.name(map.lookup(ip.parse().unwrap())).unwrap();
        assert_eq!(region("10.2.3.4"), "eu");
        assert_eq!(region("10.1.3.4"), "us");
        assert_eq!(region("::ffff:10.1.3.4"), "us");
        assert_eq!(region("2001:db8::1"), "eu");
        assert_eq!(region("192.0.2.1"), "default");
    }
}
