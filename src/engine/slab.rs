//! Connection slots with generations and stable addresses.
//!
//! Each slot's value lives in its own heap cell, allocated the first time
//! the slot is used and reused after: an io_uring op may point into a
//! connection (its PROXY header, its backend address) while the slab grows,
//! and a worker that has served N connections at once allocates N cells
//! once, not one per connection.

/// A slab of `T` addressed by (index, generation).
pub struct Slab<T> {
    cells: Vec<(u32, Box<Option<T>>)>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            cells: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value`; returns its index and generation.
    pub fn insert(&mut self, value: T) -> (u32, u32) {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let (gen, cell) = &mut self.cells[index as usize];
            *gen = gen.wrapping_add(1) & 0xff_ffff;
            **cell = Some(value);
            return (index, *gen);
        }
        self.cells.push((0, Box::new(Some(value))));
        ((self.cells.len() - 1) as u32, 0)
    }

    /// The value at `index` if it is of generation `gen`.
    #[inline]
    pub fn get_mut(&mut self, index: u32, gen: u32) -> Option<&mut T> {
        match self.cells.get_mut(index as usize) {
            Some((g, cell)) if *g == gen => cell.as_mut().as_mut(),
            _ => None,
        }
    }

    /// Takes the value out; the slot becomes free.
    pub fn remove(&mut self, index: u32) -> Option<T> {
        let value = self.cells.get_mut(index as usize)?.1.take();
        if value.is_some() {
            self.free.push(index);
            self.len -= 1;
        }
        value
    }

    /// Occupied slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no slot is occupied.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every occupied slot's value.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.cells.iter().filter_map(|(_, c)| c.as_ref().as_ref())
    }

    /// Every occupied slot's value, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.cells.iter_mut().filter_map(|(_, c)| c.as_mut().as_mut())
    }

    /// (index, generation) of every occupied slot.
    pub fn keys(&self) -> Vec<(u32, u32)> {
        self.cells
            .iter()
            .enumerate()
            .filter(|(_, (_, c))| c.is_some())
            .map(|(i, (g, _))| (i as u32, *g))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_gets_a_new_generation_and_the_same_cell() {
        let mut s = Slab::default();
        let (a, ga) = s.insert(1);
        let addr = s.get_mut(a, ga).unwrap() as *mut i32;
        assert_eq!(s.remove(a), Some(1));
        assert_eq!(s.remove(a), None, "twice is nothing");
        let (b, gb) = s.insert(2);
        assert_eq!(a, b);
        assert_ne!(ga, gb);
        assert!(s.get_mut(a, ga).is_none(), "a stale generation finds nothing");
        assert_eq!(s.get_mut(b, gb).map(|v| v as *mut i32), Some(addr));
        assert_eq!(s.len(), 1);
        assert_eq!(s.keys(), vec![(b, gb)]);
    }
}
