//! Path-prefix routing: the longest route that matches a whole number of
//! path segments wins. The table is immutable; a new one is swapped in
//! whole (see [`crate::app::Shared::router`]), so a lookup takes no lock.

use std::sync::Arc;

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
