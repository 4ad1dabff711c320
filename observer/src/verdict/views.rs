//! The inventory as the drain path reads it: the attribution index and the policy engine,
//! kept current as snapshots arrive.
//!
//! A snapshot that differs from the last one only in pods (the common case: pods churn,
//! policies and namespaces seldom change) is applied in place: the attributor updates the
//! addresses of the changed pods, the engine keeps its compiled policies and generation, and
//! the verdict cache loses only the verdicts that involve a changed pod. Any other change
//! rebuilds both and empties the cache.

use std::sync::Arc;

use super::{Engine, VerdictCache};
use crate::inventory::{Attributor, Inventory, NodeAddrs, Service, rebase};

/// Attribution index and policy engine over the same snapshot.
#[derive(Debug)]
pub struct Views {
    /// Address → endpoint.
    pub attributor: Attributor,
    /// Policies over the snapshot (which [`Engine::inventory`] returns).
    pub engine: Engine,
}

/// What [`Views::update`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// Only pods changed: this many pods were removed or changed, this many added or
    /// changed, and this many cached verdicts dropped.
    Pods {
        /// Old versions of changed pods, and pods gone.
        removed: usize,
        /// New versions of changed pods, and new pods.
        added: usize,
        /// Cached verdicts invalidated.
        invalidated: usize,
    },
    /// Namespaces or policies changed: everything was rebuilt and the cache emptied.
    Rebuilt,
}

impl Views {
    /// Views of `inventory`.
    pub fn new(inventory: Arc<Inventory>, node: NodeAddrs) -> Self {
        Self {
            attributor: Attributor::new(&inventory, node),
            engine: Engine::new(inventory),
        }
    }

    /// Moves the views to `inventory`, invalidating what changed in `cache`. Unchanged
    /// objects of `inventory` are swapped for the `Arc`s already in use (see
    /// [`rebase`](crate::inventory::rebase)), so [`Engine::inventory`] afterwards is
    /// equal to `inventory` but not necessarily the same allocation.
    pub fn update(&mut self, inventory: Arc<Inventory>, cache: &VerdictCache) -> Update {
        update_views(&mut self.attributor, &mut self.engine, cache, inventory)
    }
}

/// [`Views::update`] for views held as separate parts: moves `attributor` and `engine` to
/// `inventory` in place when only pods changed, else rebuilds both; invalidates `cache` to
/// match.
pub fn update_views(
    attributor: &mut Attributor,
    engine: &mut Engine,
    cache: &VerdictCache,
    inventory: Arc<Inventory>,
) -> Update {
    let services_changed = !same_services(&engine.inventory().services, &inventory.services);
    let (inventory, delta) = rebase(engine.inventory(), inventory);
    match engine.with_pods_of(Arc::clone(&inventory)) {
        Some(next) => {
            attributor.apply(&delta.removed, &delta.added);
            if services_changed {
                attributor.set_services(&inventory.services);
            }
            *engine = next;
            Update::Pods {
                removed: delta.removed.len(),
                added: delta.added.len(),
                invalidated: cache.invalidate(&delta),
            }
        }
        None => {
            *attributor = Attributor::new(&inventory, attributor.node().clone());
            *engine = Engine::new(inventory);
            cache.clear();
            Update::Rebuilt
        }
    }
}

fn same_services(a: &[Arc<Service>], b: &[Arc<Service>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(x, y) || x.as_ref() == y.as_ref())
}
