//! Path-prefix routing: the longest route that matches a whole number of
//! path segments wins. A [`Router`] is immutable; [`Routes`] holds the one
//! in force, which a reload replaces whole, so a lookup takes no lock.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::normalize_route;
use crate::runtime::Module;

/// An immutable routing table.
#[derive(Default)]
pub struct Router {
    /// Sorted by route length, longest first, so the first match wins.
    routes: Vec<(String, Arc<Module>)>,
}

impl Router {
    /// Builds a table from loaded modules.
    pub fn new(modules: impl IntoIterator<Item = Arc<Module>>) -> Self {
        let mut routes: Vec<_> = modules
            .into_iter()
            .map(|m| (normalize_route(&m.route).to_owned(), m))
            .collect();
        routes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Router { routes }
    }

    /// The module serving `path`, if any.
    pub fn route(&self, path: &str) -> Option<&Arc<Module>> {
        self.routes
            .iter()
            .find(|(prefix, _)| matches_prefix(prefix, path))
            .map(|(_, m)| m)
    }

    /// Every module, in routing order.
    pub fn modules(&self) -> impl Iterator<Item = &Arc<Module>> {
        self.routes.iter().map(|(_, m)| m)
    }
}

/// The routing table in force. Reload publishes; the traffic server and
/// the admin port read.
#[derive(Default)]
pub struct Routes(ArcSwap<Router>);

impl Routes {
    /// The table now; requests keep the modules they routed to even if a
    /// reload publishes a new table meanwhile.
    pub fn current(&self) -> arc_swap::Guard<Arc<Router>> {
        self.0.load()
    }

    /// Replaces the table.
    pub fn publish(&self, router: Router) {
        self.0.store(Arc::new(router));
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`.
fn matches_prefix(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::matches_prefix;

    #[test]
    fn prefix_matches_whole_segments() {
        assert!(matches_prefix("/api", "/api"));
        assert!(matches_prefix("/api", "/api/"));
        assert!(matches_prefix("/api", "/api/items/1"));
        assert!(!matches_prefix("/api", "/apix"));
        assert!(!matches_prefix("/api", "/"));
        assert!(matches_prefix("/", "/anything"));
    }
}
