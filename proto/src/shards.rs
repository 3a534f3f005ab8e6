//! A hash map split into shards behind `Arc`s. Cloning it shares every
//! shard; a write copies only the shard it touches. A proxy applying a
//! one-pod change to a 10,000-workload model copies ~1/64 of each index
//! instead of rebuilding it, while the hot path's lookups stay one hash
//! away.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

/// The hash of the data path's lookups (addresses, names): foldhash,
/// seeded per map. std's SipHash took 2.4 % of a proxied request's
/// instructions in the waypoint, four lookups a request (docs/benchmarks.md).
/// The keys come from config, not from clients.
pub type FastHash = foldhash::fast::RandomState;

/// A `HashMap` with [`FastHash`].
pub type FastMap<K, V> = HashMap<K, V, FastHash>;

const SHARDS: usize = 64;

#[derive(Debug, Clone)]
pub struct Shards<K, V> {
    hasher: FastHash,
    shards: Vec<Arc<FastMap<K, V>>>,
}

impl<K, V> Default for Shards<K, V> {
    fn default() -> Self {
        Shards {
            // Each map seeded on its own: a shard's keys share the
            // index's hash bits, not the map's.
            hasher: FastHash::default(),
            shards: (0..SHARDS).map(|_| Arc::new(FastMap::default())).collect(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Shards<K, V> {
    fn index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.index(key)].get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let i = self.index(&key);
        Arc::make_mut(&mut self.shards[i]).insert(key, value)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.index(key);
        if !self.shards[i].contains_key(key) {
            return None; // no copy of a shared shard for nothing
        }
        Arc::make_mut(&mut self.shards[i]).remove(key)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_until_written() {
        let mut a: Shards<u32, u32> = Shards::default();
        for i in 0..1000 {
            a.insert(i, i);
        }
        let mut b = a.clone();
        b.insert(5, 50);
        assert_eq!(b.remove(&7), Some(7));
        assert_eq!((a.get(&5), b.get(&5)), (Some(&5), Some(&50)));
        assert_eq!((a.get(&7), b.get(&7)), (Some(&7), None));
        let shared = a
            .shards
            .iter()
            .zip(&b.shards)
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert!(shared >= SHARDS - 2, "only the touched shards were copied");
        assert_eq!((a.len(), b.len()), (1000, 999));
    }
}
