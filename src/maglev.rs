//! Placeholder: being written (temporary stub API for the lead's build).
#![allow(missing_docs, dead_code)]
pub const DEFAULT_TABLE_SIZE: usize = 65537;
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("not prime")]
    NotPrime(usize),
    #[error("too small")]
    TooSmall { size: usize, backends: usize },
    #[error("no weight")]
    NoWeight,
}
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2;
    while i * i <= n {
        if n % i == 0 {
            return false;
        }
        i += 1;
    }
    true
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Vec<u32>,
}
impl MaglevTable {
    pub fn build<K: AsRef<[u8]>>(backends: &[(K, u32)], size: usize) -> Result<Self, MaglevError> {
        let live: Vec<u32> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.1 > 0)
            .flat_map(|(i, b)| std::iter::repeat_n(i as u32, b.1 as usize))
            .collect();
        if live.is_empty() {
            return Err(MaglevError::NoWeight);
        }
        Ok(MaglevTable {
            slots: (0..size).map(|i| live[i % live.len()]).collect(),
        })
    }
    pub fn size(&self) -> usize {
        self.slots.len()
    }
    pub fn lookup(&self, hash: u64) -> u32 {
        self.slots[(hash % self.slots.len() as u64) as usize]
    }
    pub fn candidates(&self, hash: u64, max: usize) -> impl Iterator<Item = u32> + '_ {
        let start = (hash % self.slots.len() as u64) as usize;
        let mut seen: Vec<u32> = Vec::new();
        (0..self.slots.len())
            .map(move |i| self.slots[(start + i) % self.slots.len()])
            .filter(move |b| {
                if seen.contains(b) {
                    false
                } else {
                    seen.push(*b);
                    true
                }
            })
            .take(max)
    }
}
