//! Memoized verdicts per flow key, for one engine generation.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Engine, FlowQuery, Peer, Verdict};
use crate::flow::{FastMap, FastSet, Protocol};
use crate::inventory::{Pod, PodDelta};

/// Identity of one endpoint in a cache key.
///
/// A pod is identified by its `Arc`: the cache holds entries of one engine generation only,
/// in which each pod object stands for one pod, and the key keeps it alive, so its address
/// cannot be reused meanwhile. Comparing and hashing the pointer instead of copying the pod's
/// namespace and name into the key takes the allocations and string compares off a lookup
/// made for every flow at every drain. Two `Arc`s of the same pod are merely two entries.
#[derive(Clone, Debug)]
pub enum EndpointKey {
    /// A pod of the inventory.
    Pod(Arc<Pod>),
    /// An external address.
    Ip(IpAddr),
}

impl PartialEq for EndpointKey {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Pod(a), Self::Pod(b)) => Arc::ptr_eq(a, b),
            (Self::Ip(a), Self::Ip(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for EndpointKey {}

impl Hash for EndpointKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Self::Pod(p) => {
                state.write_u8(0);
                std::ptr::hash(Arc::as_ptr(p), state);
            }
            Self::Ip(ip) => {
                state.write_u8(1);
                ip.hash(state);
            }
        }
    }
}

impl EndpointKey {
    fn of(peer: &Peer) -> Self {
        match peer {
            Peer::Pod(p) => EndpointKey::Pod(Arc::clone(p)),
            Peer::External(ip) => EndpointKey::Ip(*ip),
        }
    }
}

/// Cache key: source, destination, protocol, port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    /// Source endpoint.
    pub src: EndpointKey,
    /// Destination endpoint.
    pub dst: EndpointKey,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port (0 for port-less protocols, whose port policies ignore).
    pub port: u16,
}

impl VerdictKey {
    /// The key of a query.
    pub fn of(flow: &FlowQuery) -> Self {
        VerdictKey {
            src: EndpointKey::of(&flow.src),
            dst: EndpointKey::of(&flow.dst),
            protocol: flow.protocol,
            port: if flow.protocol.has_ports() {
                flow.port
            } else {
                0
            },
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    map: FastMap<VerdictKey, Arc<Verdict>>,
}

/// A bounded verdict cache. Entries belong to one [`Engine::generation`]: the first lookup
/// with an engine of another generation (a new inventory) empties the cache. When full, the
/// cache is emptied too: flows that matter come back within a scrape interval, and a
/// wholesale reset keeps the cost of bookkeeping at zero on the hot path.
#[derive(Debug)]
pub struct VerdictCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl VerdictCache {
    /// A cache holding at most `capacity` verdicts (at least 1).
    pub fn new(capacity: usize) -> Self {
        VerdictCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The cached verdict for `flow`, evaluating it with `engine` on a miss.
    pub fn get_or_evaluate(&self, engine: &Engine, flow: &FlowQuery) -> Arc<Verdict> {
        let key = VerdictKey::of(flow);
        {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if inner.generation != engine.generation() {
                inner.map.clear();
                inner.generation = engine.generation();
            } else if let Some(v) = inner.map.get(&key) {
                return Arc::clone(v);
            }
        }
        // Evaluate outside the lock so that concurrent misses do not serialize.
        let verdict = Arc::new(engine.evaluate(flow));
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.generation == engine.generation() {
            if inner.map.len() >= self.capacity {
                inner.map.clear();
            }
            inner.map.insert(key, Arc::clone(&verdict));
        }
        verdict
    }

    /// Number of cached verdicts.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the verdicts that involve a pod of `delta`: flows from or to a removed pod, and
    /// flows from or to an address of a removed or added pod (an address that was no pod's, or
    /// another pod's, before). Every other verdict stays: it reads no other pod.
    pub fn invalidate(&self, delta: &PodDelta) -> usize {
        if delta.is_empty() {
            return 0;
        }
        let pods: FastSet<*const Pod> = delta.removed.iter().map(Arc::as_ptr).collect();
        let ips: FastSet<IpAddr> = delta.addresses().collect();
        let involved = |e: &EndpointKey| match e {
            EndpointKey::Pod(p) => pods.contains(&Arc::as_ptr(p)),
            EndpointKey::Ip(ip) => ips.contains(&ip.to_canonical()),
        };
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let before = inner.map.len();
        inner
            .map
            .retain(|k, _| !involved(&k.src) && !involved(&k.dst));
        before - inner.map.len()
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .clear();
    }
}
