//! A bound on the connections a listener (the control socket, the metrics endpoint) keeps at
//! once. A connection is admitted waiting for its request and marked working while it is
//! answered. When every place is taken, the connection that has waited longest without sending
//! a request is closed to make room: clients that connect and send nothing cannot keep a real
//! request out. Only when every place is answering a request is a newcomer refused.
//!
//! It never reads or writes a connection: a listener hands it a way to close one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Every place is answering a request.
#[derive(Debug, thiserror::Error)]
#[error("{limit} connections are being answered already (the limit); try again shortly")]
pub struct LimitReached {
    pub limit: usize,
}

type Close = Box<dyn FnOnce() + Send>;

struct Place {
    working: bool,
    close: Close,
}

#[derive(Default)]
struct Places {
    next: u64,
    /// By admission order, so the first waiting one is the one that has waited longest.
    open: BTreeMap<u64, Place>,
}

/// At most `limit` connections at once (see the module's comment).
#[derive(Clone)]
pub struct ConnectionLimit {
    limit: usize,
    places: Arc<Mutex<Places>>,
}

/// A connection's place; dropping it frees the place.
pub struct Admission {
    id: u64,
    places: Arc<Mutex<Places>>,
}

impl ConnectionLimit {
    pub fn new(limit: usize) -> ConnectionLimit {
        ConnectionLimit {
            limit: limit.max(1),
            places: Arc::default(),
        }
    }

    /// Admits a connection that `close` closes, waiting for its request; when every place is
    /// taken, closes the longest-waiting connection first.
    pub fn admit(&self, close: impl FnOnce() + Send + 'static) -> Result<Admission, LimitReached> {
        let evicted = {
            let mut places = self.places.lock().unwrap_or_else(PoisonError::into_inner);
            let evicted = if places.open.len() >= self.limit {
                let waiting = places
                    .open
                    .iter()
                    .find(|(_, place)| !place.working)
                    .map(|(id, _)| *id)
                    .ok_or(LimitReached { limit: self.limit })?;
                places.open.remove(&waiting)
            } else {
                None
            };
            let id = places.next;
            places.next += 1;
            places.open.insert(
                id,
                Place {
                    working: false,
                    close: Box::new(close),
                },
            );
            (evicted, id)
        };
        let (evicted, id) = evicted;
        // Closed outside the lock: closing may wake the connection's own thread or task.
        if let Some(place) = evicted {
            (place.close)();
        }
        Ok(Admission {
            id,
            places: Arc::clone(&self.places),
        })
    }

    /// How many connections hold a place.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .len()
    }
}

impl Admission {
    /// Marks the connection as answering a request (`true`), which keeps its place, or as
    /// waiting for one again; false when it was closed to make room and has no place left.
    pub fn working(&self, working: bool) -> bool {
        let mut places = self.places.lock().unwrap_or_else(PoisonError::into_inner);
        match places.open.get_mut(&self.id) {
            Some(place) => {
                place.working = working;
                true
            }
            None => false,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_full_limit_closes_the_longest_waiting_connection_for_a_newcomer() {
        let limit = ConnectionLimit::new(2);
        let closed = Arc::new(AtomicUsize::new(usize::MAX));
        let closer = |index: usize| {
            let closed = Arc::clone(&closed);
            move || closed.store(index, Ordering::SeqCst)
        };
        let first = limit.admit(closer(0)).unwrap();
        let second = limit.admit(closer(1)).unwrap();
        assert!(first.working(true));
        let third = limit.admit(closer(2)).unwrap();
        assert_eq!(closed.load(Ordering::SeqCst), 1, "the waiting one goes");
        assert_eq!(limit.open(), 2);
        assert!(!second.working(true), "an evicted connection has no place");
        drop(second);
        assert_eq!(
            limit.open(),
            2,
            "an evicted connection's drop frees nothing twice"
        );
        assert!(third.working(true));
        let refused = limit.admit(closer(3)).map(|_| ()).unwrap_err();
        assert!(refused.to_string().contains("2 connections"), "{refused}");
        drop(first);
        let _fourth = limit.admit(closer(4)).unwrap();
        assert_eq!(limit.open(), 2);
    }
}
