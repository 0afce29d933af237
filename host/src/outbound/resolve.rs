//! Name resolution for outbound calls, with the restricted-address guard
//! inside it.
//!
//! The guard sits in the resolver the connector uses, so it judges the very
//! addresses the connection is made to: no second lookup that a rebinding
//! name could answer differently, no cached verdict, and a lookup failure
//! fails the call (closed) instead of waving it through. Our own code
//! rather than a crate: it is a filter over the system resolver's answer,
//! and no maintained resolver crate offers one.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

use super::policy::is_restricted;

/// Looks a host name up; injectable so tests can answer as they like.
pub(super) type Lookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>> + Send + Sync,
>;

/// The system resolver (`getaddrinfo`, through tokio).
pub(super) fn system_lookup() -> Lookup {
    Arc::new(|host: String| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    })
}

/// Why a name was refused: every address it resolved to is restricted.
#[derive(Debug, thiserror::Error)]
#[error("`{name}` resolves only to loopback, link-local or metadata addresses ({addrs:?})")]
pub(super) struct Restricted {
    name: String,
    addrs: Vec<IpAddr>,
}

/// A resolver for hyper-util's connector. When `guard` is on, restricted
/// addresses are dropped from every answer, and an answer with nothing
/// left fails with [`Restricted`].
#[derive(Clone)]
pub(super) struct GuardedResolver {
    lookup: Lookup,
    guard: bool,
}

impl GuardedResolver {
    pub(super) fn new(lookup: Lookup, guard: bool) -> Self {
        GuardedResolver { lookup, guard }
    }
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let (lookup, guard) = (self.lookup.clone(), self.guard);
        Box::pin(async move {
            let name = name.as_str().to_owned();
            let addrs = lookup(name.clone()).await?;
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .filter(|ip| !guard || !is_restricted(**ip))
                .map(|ip| SocketAddr::new(*ip, 0))
                .collect();
            if allowed.is_empty() {
                if addrs.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("`{name}` resolved to no address"),
                    ));
                }
                return Err(io::Error::other(Restricted { name, addrs }));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// Whether a client error came from the guard.
pub(super) fn is_restricted_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.is::<Restricted>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.get_ref().is_some_and(|inner| inner.is::<Restricted>())
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tower::Service;

    use super::*;

    /// A lookup that gives each answer in turn, then fails.
    fn scripted(answers: Vec<io::Result<Vec<&'static str>>>) -> Lookup {
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        Arc::new(move |_host| {
            let next = answers.lock().unwrap().next();
            Box::pin(async move {
                match next {
                    Some(Ok(ips)) => Ok(ips.iter().map(|ip| ip.parse().unwrap()).collect()),
                    Some(Err(e)) => Err(e),
                    None => Err(io::Error::other("no more answers")),
                }
            })
        })
    }

    async fn resolve(r: &mut GuardedResolver, host: &str) -> io::Result<Vec<SocketAddr>> {
        r.call(host.parse().unwrap()).await.map(|a| a.collect())
    }

    #[tokio::test]
    async fn a_name_that_rebinds_is_judged_on_every_answer() {
        let mut r = GuardedResolver::new(
            scripted(vec![
                Ok(vec!["93.184.216.34"]),
                Ok(vec!["127.0.0.1"]),
                Ok(vec!["169.254.169.254", "93.184.216.34"]),
                Ok(vec!["::ffff:127.0.0.1", "fd00:ec2::254"]),
            ]),
            true,
        );
        assert_eq!(
            resolve(&mut r, "rebind.example").await.unwrap(),
            vec!["93.184.216.34:0".parse().unwrap()]
        );
        let err = resolve(&mut r, "rebind.example").await.unwrap_err();
        assert!(is_restricted_error(&err), "{err}");
        // Mixed answers keep only the allowed addresses.
        assert_eq!(
            resolve(&mut r, "rebind.example").await.unwrap(),
            vec!["93.184.216.34:0".parse().unwrap()]
        );
        assert!(is_restricted_error(
            &resolve(&mut r, "rebind.example").await.unwrap_err()
        ));
    }

    #[tokio::test]
    async fn a_failed_or_empty_lookup_fails_the_call() {
        let mut r = GuardedResolver::new(
            scripted(vec![
                Err(io::Error::new(io::ErrorKind::TimedOut, "dns timeout")),
                Ok(vec![]),
            ]),
            true,
        );
        assert!(resolve(&mut r, "flaky.example").await.is_err());
        assert!(resolve(&mut r, "flaky.example").await.is_err());
    }

    #[tokio::test]
    async fn without_the_guard_every_address_is_kept() {
        let mut r = GuardedResolver::new(scripted(vec![Ok(vec!["127.0.0.1"])]), false);
        assert_eq!(
            resolve(&mut r, "localhost").await.unwrap(),
            vec!["127.0.0.1:0".parse().unwrap()]
        );
    }
}
