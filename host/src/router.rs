//! Path-prefix routing: the longest route that matches a whole number of
//! path segments wins. A [`Router`] is immutable; [`Routes`] holds the one
//! in force, which a reload replaces whole, so a lookup takes no lock.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;

use crate::canary::Canary;
use crate::config::{Track, normalize_route};
use crate::runtime::Module;

/// What serves one route: the stable version, and a canary while one runs.
#[derive(Clone)]
pub struct Release {
    /// The version serving.
    pub stable: Arc<Module>,
    /// A canary given part of the traffic, if one runs.
    pub canary: Option<Arc<Canary>>,
}

impl Release {
    /// A release with no canary.
    pub fn stable(module: Arc<Module>) -> Self {
        Release {
            stable: module,
            canary: None,
        }
    }

    /// The version to serve a request with these headers, and the canary
    /// that picked it (whose window counts the request).
    pub fn pick(&self, headers: &HeaderMap) -> (&Arc<Module>, Option<(&Arc<Canary>, Track)>) {
        match &self.canary {
            None => (&self.stable, None),
            Some(canary) => match canary.pick(headers) {
                Track::Canary => (&canary.module, Some((canary, Track::Canary))),
                Track::Stable => (&self.stable, Some((canary, Track::Stable))),
            },
        }
    }
}

/// An immutable routing table.
#[derive(Default)]
pub struct Router {
    /// Sorted by route length, longest first, so the first match wins.
    routes: Vec<(String, Release)>,
}

impl Router {
    /// Builds a table from loaded modules, none with a canary.
    pub fn new(modules: impl IntoIterator<Item = Arc<Module>>) -> Self {
        Self::with_releases(modules.into_iter().map(Release::stable))
    }

    /// Builds a table from releases.
    pub fn with_releases(releases: impl IntoIterator<Item = Release>) -> Self {
        let mut routes: Vec<_> = releases
            .into_iter()
            .map(|r| (normalize_route(&r.stable.route).to_owned(), r))
            .collect();
        routes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Router { routes }
    }

    /// The release serving `path`, if any.
    pub fn route(&self, path: &str) -> Option<&Release> {
        self.routes
            .iter()
            .find(|(prefix, _)| matches_prefix(prefix, path))
            .map(|(_, r)| r)
    }

    /// Every module's stable version, in routing order.
    pub fn modules(&self) -> impl Iterator<Item = &Arc<Module>> {
        self.routes.iter().map(|(_, r)| &r.stable)
    }

    /// Every release, in routing order.
    pub fn releases(&self) -> impl Iterator<Item = &Release> {
        self.routes.iter().map(|(_, r)| r)
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
