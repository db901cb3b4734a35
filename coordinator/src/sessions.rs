//! Which key names which registered worker. `Register` opens a session; losing the worker closes
//! it, so a stale key (a worker declared lost, or a coordinator restart) names nobody and its
//! holder must register again.

use std::collections::BTreeMap;
use std::sync::Mutex;

use proto::credentials::WorkerKey;

use crate::state::WorkerId;

#[derive(Debug, Default)]
pub struct Sessions {
    keys: Mutex<BTreeMap<WorkerId, WorkerKey>>,
}

impl Sessions {
    fn keys(&self) -> std::sync::MutexGuard<'_, BTreeMap<WorkerId, WorkerKey>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh key for `worker`.
    pub fn open(&self, worker: WorkerId) -> WorkerKey {
        let key = WorkerKey::random();
        self.keys().insert(worker, key);
        key
    }

    pub fn close(&self, worker: WorkerId) {
        self.keys().remove(&worker);
    }

    pub fn len(&self) -> usize {
        self.keys().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The worker `key` names. Compares against every open session without stopping at a match,
    /// so the time taken says nothing about which keys exist (the sessions are few: at most
    /// `--max-workers`).
    pub fn find(&self, key: &WorkerKey) -> Option<WorkerId> {
        self.keys().iter().fold(
            None,
            |found, (&id, k)| if k.matches(key) { Some(id) } else { found },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_its_worker_until_the_session_closes() {
        let sessions = Sessions::default();
        let a = sessions.open(WorkerId(1));
        let b = sessions.open(WorkerId(2));
        assert_eq!(sessions.find(&a), Some(WorkerId(1)));
        assert_eq!(sessions.find(&b), Some(WorkerId(2)));
        assert_eq!(sessions.find(&WorkerKey::random()), None);
        sessions.close(WorkerId(1));
        assert_eq!(sessions.find(&a), None, "a stale key names nobody");
        // Registering again gives a new key; the old one stays dead.
        let a2 = sessions.open(WorkerId(3));
        assert_ne!(a2, a);
        assert_eq!(sessions.find(&a), None);
        assert_eq!(sessions.len(), 2);
    }
}
