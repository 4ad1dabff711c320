//! [`Labels`]: an object's labels as one shared, interned, sorted set.
//!
//! A 10,000-pod inventory held each pod's labels as its own `BTreeMap<String, String>`: a
//! B-tree node plus two heap strings per label, about 0.8 KB per pod, although the replicas of
//! one ReplicaSet carry the very same set and most keys (`app`, `app.kubernetes.io/name`,
//! `pod-template-hash`) and many values (namespace and team names) recur across thousands of
//! objects. Here every distinct label set is one allocation, shared by every object that
//! carries it, and every distinct key or value string is one allocation, shared by every set
//! that uses it. A pod then pays one pointer pair for its labels.
//!
//! ## The interner
//!
//! One process-wide interner, not one per inventory: labels are built in many places (the
//! manifest and API converters, the delta path, the preflight's implied namespaces, tests)
//! that have no inventory to hang an interner on, and both inventory sources live in the same
//! process for the daemon's whole life, so a per-inventory table would only duplicate the
//! strings that two snapshots share during a reload.
//!
//! An entry that nobody but the interner holds (`Arc::strong_count == 1`) is garbage: the
//! objects that used it are gone. [`prune`] drops such entries; inventory sources call it when
//! they build a new snapshot, and the interner also prunes itself when it has doubled since
//! its last prune, so reloads and watch churn cannot grow it without bound even where no
//! caller prunes: it holds at most about twice what live objects use (plus a small floor).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One label, both sides interned.
type Pair = (Arc<str>, Arc<str>);

/// Labels of an object: a map from key to value, iterated in key order.
///
/// Reads like the `BTreeMap<String, String>` it replaces ([`get`](Self::get),
/// [`contains_key`](Self::contains_key), [`iter`](Self::iter), ...). It is immutable in place:
/// [`insert`](Self::insert) and [`retain`](Self::retain) build and intern a new set (loaders
/// rarely edit labels). Equal label sets built anywhere in the process share one allocation
/// (see the [module docs](self)); empty labels allocate nothing.
#[derive(Clone, Default)]
pub struct Labels(Option<Arc<[Pair]>>);

impl Labels {
    /// No labels (allocates nothing).
    pub const fn new() -> Self {
        Labels(None)
    }

    fn pairs(&self) -> &[Pair] {
        self.0.as_deref().unwrap_or(&[])
    }

    /// The value of label `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        let pairs = self.pairs();
        pairs
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| pairs[i].1.as_ref())
    }

    /// True when label `key` is set (to any value, empty included).
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// `(key, value)` pairs in key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.pairs().iter())
    }

    /// Keys in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator {
        self.pairs().iter().map(|(k, _)| k.as_ref())
    }

    /// Values in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator {
        self.pairs().iter().map(|(_, v)| v.as_ref())
    }

    /// How many labels.
    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    /// True when there is no label.
    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }

    /// Sets label `key` to `value`, returning the value it replaced. Builds a new set: the
    /// current one may be shared by other objects.
    pub fn insert(&mut self, key: &str, value: &str) -> Option<String> {
        let old = self.get(key).map(str::to_owned);
        if old.as_deref() == Some(value) {
            return old;
        }
        *self = self
            .iter()
            .filter(|(k, _)| *k != key)
            .chain([(key, value)])
            .collect();
        old
    }

    /// Keeps only the labels for which `keep(key, value)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        // `keep` may be stateful: call it once per label, as `BTreeMap::retain` does.
        let kept: Vec<bool> = self.iter().map(|(k, v)| keep(k, v)).collect();
        if kept.iter().all(|k| *k) {
            return;
        }
        *self = self
            .iter()
            .zip(kept)
            .filter_map(|(kv, keep)| keep.then_some(kv))
            .collect();
    }

    /// The labels as an owned map (for API types such as `LabelSelector::match_labels`).
    pub fn to_btree_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// True when `self` and `other` share one allocation (or are both empty): what interning
    /// gives equal sets.
    pub fn ptr_eq(&self, other: &Labels) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    /// Interns pairs sorted by key, without duplicate keys.
    fn intern_sorted<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Labels {
        if pairs.is_empty() {
            return Labels(None);
        }
        let mut interner = interner();
        let pairs: Vec<Pair> = pairs
            .iter()
            .map(|(k, v)| (interner.string(k.as_ref()), interner.string(v.as_ref())))
            .collect();
        Labels(Some(interner.set(pairs)))
    }
}

/// Iterator over `(key, value)` in key order; see [`Labels::iter`].
#[derive(Clone, Debug)]
pub struct Iter<'a>(std::slice::Iter<'a, Pair>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Like `BTreeMap`'s: a later pair replaces an earlier one with the same key.
impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut pairs: Vec<(K, V)> = iter.into_iter().collect();
        // Reversed, then a stable sort: of equal keys the last given comes first, and dedup
        // keeps the first.
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        pairs.dedup_by(|later, first| later.0.as_ref() == first.0.as_ref());
        Labels::intern_sorted(&pairs)
    }
}

/// Like `BTreeMap`'s: an extended pair replaces the label with the same key. Builds a new set.
impl<K: AsRef<str>, V: AsRef<str>> Extend<(K, V)> for Labels {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        let added: Vec<(K, V)> = iter.into_iter().collect();
        if added.is_empty() {
            return;
        }
        *self = self
            .iter()
            .chain(added.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))
            .collect();
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        let pairs: Vec<(String, String)> = map.into_iter().collect();
        Labels::intern_sorted(&pairs)
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        let pairs: Vec<(&String, &String)> = map.iter().collect();
        Labels::intern_sorted(&pairs)
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<&Labels> for BTreeMap<String, String> {
    fn from(labels: &Labels) -> Self {
        labels.to_btree_map()
    }
}

impl PartialEq for Labels {
    fn eq(&self, other: &Self) -> bool {
        // Interned sets are equal exactly when they are one allocation; the comparison of
        // contents is the fallback for the rare set built while another was being pruned.
        self.ptr_eq(other) || self.pairs() == other.pairs()
    }
}

impl Eq for Labels {}

impl PartialEq<BTreeMap<String, String>> for Labels {
    fn eq(&self, other: &BTreeMap<String, String>) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other)
                .all(|((k, v), (ok, ov))| k == ok && v == ov)
    }
}

impl Hash for Labels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.pairs().hash(state);
    }
}

impl PartialOrd for Labels {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// As `BTreeMap`'s: the pairs compared in key order.
impl Ord for Labels {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.iter().cmp(other.iter())
    }
}

/// As a map, like the `BTreeMap` it replaces: `{"app": "web"}`.
impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// As a JSON object in key order, the `BTreeMap`'s output.
impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Labels::from)
    }
}

/// The interner never prunes itself below this many entries: pruning a small table saves
/// nothing worth a scan.
const PRUNE_FLOOR: usize = 4096;

type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

struct Interner {
    strings: FastSet<Arc<str>>,
    sets: FastSet<Arc<[Pair]>>,
    /// Entries (strings and sets) at which interning prunes by itself.
    prune_at: usize,
}

static INTERNER: LazyLock<Mutex<Interner>> = LazyLock::new(|| Mutex::new(Interner::new()));

/// The interner, locked. A panic while it was held cannot leave a table half-updated in a way
/// that matters (an entry is there or not), so poisoning is ignored.
fn interner() -> MutexGuard<'static, Interner> {
    INTERNER.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Interner {
    fn new() -> Self {
        Interner {
            strings: FastSet::default(),
            sets: FastSet::default(),
            prune_at: PRUNE_FLOOR,
        }
    }

    fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(found) = self.strings.get(s) {
            return Arc::clone(found);
        }
        self.maybe_prune();
        let new: Arc<str> = Arc::from(s);
        self.strings.insert(Arc::clone(&new));
        new
    }

    fn set(&mut self, pairs: Vec<Pair>) -> Arc<[Pair]> {
        if let Some(found) = self.sets.get(pairs.as_slice()) {
            return Arc::clone(found);
        }
        self.maybe_prune();
        let new: Arc<[Pair]> = Arc::from(pairs);
        self.sets.insert(Arc::clone(&new));
        new
    }

    fn maybe_prune(&mut self) {
        if self.strings.len() + self.sets.len() >= self.prune_at {
            self.prune();
        }
    }

    fn prune(&mut self) -> Pruned {
        let before = (self.sets.len(), self.strings.len());
        // Sets first: a dropped set releases its strings, which may then go too.
        self.sets.retain(|s| Arc::strong_count(s) > 1);
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        let live = self.strings.len() + self.sets.len();
        self.prune_at = live.saturating_mul(2).max(PRUNE_FLOOR);
        // Give back the tables' own memory after a large cluster shrank.
        if self.sets.capacity() > 4 * self.sets.len().max(64) {
            self.sets.shrink_to_fit();
        }
        if self.strings.capacity() > 4 * self.strings.len().max(64) {
            self.strings.shrink_to_fit();
        }
        Pruned {
            sets: before.0 - self.sets.len(),
            strings: before.1 - self.strings.len(),
        }
    }
}

/// What one [`prune`] freed.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Label sets no object used any more.
    pub sets: usize,
    /// Key and value strings no label set used any more.
    pub strings: usize,
}

/// Drops the interned label sets and strings that no object holds any more. Inventory sources
/// call it when they build a new snapshot; interning also calls it by itself when the tables
/// have doubled since the last prune (see the [module docs](self)).
pub fn prune() -> Pruned {
    interner().prune()
}

/// True when `s` is an interned key or value (for tests of the inventory sources' pruning).
#[cfg(test)]
pub(crate) fn is_interned(s: &str) -> bool {
    interner().strings.contains(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn iterates_in_key_order_and_looks_up() {
        let l: Labels = [("b", "2"), ("a", "1"), ("c", "3")].into_iter().collect();
        assert_eq!(
            l.iter().collect::<Vec<_>>(),
            [("a", "1"), ("b", "2"), ("c", "3")]
        );
        assert_eq!(l.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(l.values().rev().collect::<Vec<_>>(), ["3", "2", "1"]);
        assert_eq!(l.get("b"), Some("2"));
        assert_eq!(l.get("bb"), None);
        assert!(l.contains_key("c"));
        assert!(!l.contains_key(""));
        assert_eq!(l.len(), 3);
        assert!(!l.is_empty());
    }

    #[test]
    fn later_duplicate_key_wins_like_btreemap() {
        let pairs = [("k", "first"), ("a", "x"), ("k", "second"), ("k", "third")];
        let l: Labels = pairs.into_iter().collect();
        let m: BTreeMap<&str, &str> = pairs.into_iter().collect();
        assert_eq!(
            l.iter().collect::<Vec<_>>(),
            m.into_iter().collect::<Vec<_>>()
        );
        assert_eq!(l.get("k"), Some("third"));
    }

    #[test]
    fn empty_labels_allocate_nothing() {
        let empty: Labels = Vec::<(String, String)>::new().into_iter().collect();
        assert!(empty.0.is_none());
        assert!(Labels::from(BTreeMap::new()).0.is_none());
        assert_eq!(empty, Labels::new());
        assert!(empty.is_empty());
        assert_eq!(empty.get("a"), None);
        assert_eq!(empty.iter().count(), 0);
    }

    #[test]
    fn equal_sets_built_separately_share_one_allocation() {
        let a: Labels = [("app", "web"), ("tier", "front")].into_iter().collect();
        let from_map: BTreeMap<String, String> = [
            ("tier".to_owned(), "front".to_owned()),
            ("app".to_owned(), "web".to_owned()),
        ]
        .into();
        let b = Labels::from(from_map);
        assert!(a.ptr_eq(&b), "{a:?} and {b:?} are two allocations");
        assert_eq!(a, b);
        // Strings are shared across different sets too.
        let c: Labels = [("app", "db")].into_iter().collect();
        let (ka, kc) = (&a.pairs()[0].0, &c.pairs()[0].0);
        assert!(Arc::ptr_eq(ka, kc));
        assert!(!a.ptr_eq(&c));
        assert_ne!(a, c);
    }

    #[test]
    fn equality_hash_and_order_follow_contents() {
        use std::hash::BuildHasher;
        let a: Labels = [("a", "1"), ("b", "2")].into();
        let b: Labels = [("b", "2"), ("a", "1")].into();
        let c: Labels = [("a", "1"), ("b", "3")].into();
        let h = foldhash::fast::FixedState::with_seed(1);
        assert_eq!(h.hash_one(&a), h.hash_one(&b));
        assert_ne!(a, c);
        assert!(a < c);
        assert!(Labels::new() < a);
        let map: BTreeMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        assert!(a == map);
        assert!(c != map);
        assert_eq!(a.to_btree_map(), map);
    }

    #[test]
    fn insert_and_retain_copy_on_write() {
        let shared: Labels = [("app", "cow"), ("x", "1")].into();
        let mut edited = shared.clone();
        assert_eq!(edited.insert("x", "2"), Some("1".to_owned()));
        assert_eq!(edited.insert("new", "v"), None);
        assert_eq!(shared.get("x"), Some("1"), "the shared set was modified");
        assert_eq!(
            edited.iter().collect::<Vec<_>>(),
            [("app", "cow"), ("new", "v"), ("x", "2")]
        );
        let same = edited.clone();
        assert_eq!(edited.insert("x", "2"), Some("2".to_owned()));
        assert!(edited.ptr_eq(&same));
        let mut calls = 0;
        edited.retain(|k, _| {
            calls += 1;
            k != "new"
        });
        assert_eq!(
            edited.iter().collect::<Vec<_>>(),
            [("app", "cow"), ("x", "2")]
        );
        assert!(calls >= 3);
        edited.retain(|_, _| false);
        assert!(edited.0.is_none());
    }

    #[test]
    fn extend_replaces_like_btreemap() {
        let mut l: Labels = [("a", "1"), ("b", "2")].into();
        l.extend([("b", "3"), ("c", "4")]);
        assert_eq!(
            l.iter().collect::<Vec<_>>(),
            [("a", "1"), ("b", "3"), ("c", "4")]
        );
        let before = l.clone();
        l.extend(Vec::<(&str, &str)>::new());
        assert!(l.ptr_eq(&before));
    }

    #[test]
    fn debug_and_json_read_as_a_map() {
        let l: Labels = [("b", "2"), ("a", "1")].into();
        let m: BTreeMap<&str, &str> = [("b", "2"), ("a", "1")].into();
        assert_eq!(format!("{l:?}"), format!("{m:?}"));
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            serde_json::to_string(&m).unwrap()
        );
        assert_eq!(serde_json::to_string(&Labels::new()).unwrap(), "{}");
        let back: Labels = serde_json::from_str(r#"{"b":"2","a":"1"}"#).unwrap();
        assert!(back.ptr_eq(&l));
    }

    #[test]
    fn prune_frees_what_nobody_holds_and_keeps_the_rest() {
        // Unique strings: other tests intern concurrently into the same process-wide tables.
        let held: Labels = [("intern-test/held", "kept-value-7f3a")].into();
        let dropped: Labels = [("intern-test/dropped", "gone-value-9c1e")].into();
        assert!(is_interned("gone-value-9c1e"));
        drop(dropped);
        prune();
        assert!(!is_interned("intern-test/dropped"));
        assert!(!is_interned("gone-value-9c1e"));
        assert!(is_interned("intern-test/held"));
        assert!(is_interned("kept-value-7f3a"));
        // A set still held is still the one interning returns.
        let again: Labels = [("intern-test/held", "kept-value-7f3a")].into();
        assert!(again.ptr_eq(&held));
    }

    #[test]
    fn prune_reports_what_it_freed() {
        // A private interner: the process-wide one is shared with tests running concurrently.
        fn set(i: &mut Interner, k: &str, v: &str) -> Arc<[Pair]> {
            let pair = (i.string(k), i.string(v));
            i.set(vec![pair])
        }
        let mut i = Interner::new();
        let held = set(&mut i, "k", "held");
        let dropped: Vec<_> = (0..50)
            .map(|n| set(&mut i, "k", &format!("v{n}")))
            .collect();
        assert_eq!((i.sets.len(), i.strings.len()), (51, 52));
        drop(dropped);
        assert_eq!(
            i.prune(),
            Pruned {
                sets: 50,
                strings: 50
            }
        );
        assert_eq!((i.sets.len(), i.strings.len()), (1, 2));
        assert!(Arc::ptr_eq(&held, &set(&mut i, "k", "held")));
        drop(held);
        assert_eq!(
            i.prune(),
            Pruned {
                sets: 1,
                strings: 2
            }
        );
    }

    #[test]
    fn interning_prunes_by_itself_when_the_tables_double() {
        let mut i = Interner::new();
        let keep: Vec<Arc<str>> = (0..PRUNE_FLOOR)
            .map(|n| i.string(&format!("live-{n}")))
            .collect();
        let mut most = 0;
        // Far more distinct strings than the floor, none held: the table stays bounded.
        for n in 0..(PRUNE_FLOOR * 20) {
            drop(i.string(&format!("churn-{n}")));
            most = most.max(i.strings.len());
        }
        assert!(
            most <= 2 * PRUNE_FLOOR + 1,
            "{most} strings at the peak: the interner does not prune by itself"
        );
        assert!(
            keep.iter().all(|s| i.strings.contains(s)),
            "a live string was pruned"
        );
    }
}
