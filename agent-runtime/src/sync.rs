//! Locking a `std::sync::Mutex` whose holder may have panicked.
//!
//! The agent's mutexes guard plain maps and counters, each updated in one step, so a panic
//! while one was held leaves nothing half-written: the data stays usable and the poison flag
//! is ignored rather than turned into a second panic in every later user.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// [`Mutex::lock`] that ignores poisoning (see the module's documentation).
pub trait MutexExt<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let held = mutex.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.locked();
            panic!("poisons the mutex");
        })
        .join();
        assert!(mutex.is_poisoned());
        *mutex.locked() += 1;
        assert_eq!(*mutex.locked(), 2);
    }
}
