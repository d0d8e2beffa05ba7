//! [`BoundedSet`]: a set that remembers its newest `capacity` members.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

/// A set holding at most `capacity` members; inserting past that forgets
/// the oldest. For "what was sent recently" memories that must not grow
/// with uptime: the groups an origin connection pushed, the chunk
/// signatures an edge was sent.
#[derive(Debug, Clone)]
pub struct BoundedSet<T> {
    set: HashSet<T>,
    order: VecDeque<T>,
    capacity: usize,
}

impl<T: Hash + Eq + Clone> BoundedSet<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Adds `value`; false if it was already there (its age is unchanged).
    pub fn insert(&mut self, value: T) -> bool {
        if !self.set.insert(value.clone()) {
            return false;
        }
        self.order.push_back(value);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    pub fn contains(&self, value: &T) -> bool {
        self.set.contains(value)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest() {
        let mut k = BoundedSet::new(2);
        assert!(k.insert(1));
        assert!(k.insert(2));
        assert!(!k.insert(1));
        assert!(k.insert(3));
        assert!(!k.contains(&1));
        assert!(k.contains(&2) && k.contains(&3));
        assert_eq!(k.len(), 2);
    }
}
