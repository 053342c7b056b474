//! Per-provider API key pools: each key admits a bounded number of concurrent upstream
//! calls, so under load requests queue for a key like they would for a real rate limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

struct ApiKey {
    secret: Arc<str>,
    slots: Arc<Semaphore>,
}

pub struct KeyPool {
    keys: Vec<ApiKey>,
    next: AtomicUsize,
}

/// The right to make one upstream call with `secret`; the slot frees on drop.
pub struct KeyLease {
    pub secret: Arc<str>,
    _slot: OwnedSemaphorePermit,
}

impl KeyPool {
    pub fn new(provider: &str, keys: usize, per_key_concurrency: usize) -> Self {
        let keys = (0..keys)
            .map(|i| ApiKey {
                secret: format!("sk-{provider}-demo-{i}").into(),
                slots: Arc::new(Semaphore::new(per_key_concurrency)),
            })
            .collect();
        Self {
            keys,
            next: AtomicUsize::new(0),
        }
    }

    /// Takes a free slot on any key, round-robin; when all are busy, queues on one key.
    pub async fn acquire(&self) -> KeyLease {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % self.keys.len();
        let rotation = self.keys[start..].iter().chain(&self.keys[..start]);
        for key in rotation {
            if let Ok(slot) = key.slots.clone().try_acquire_owned() {
                return KeyLease {
                    secret: key.secret.clone(),
                    _slot: slot,
                };
            }
        }
        let key = &self.keys[start];
        let slot = key
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("key semaphores are never closed");
        KeyLease {
            secret: key.secret.clone(),
            _slot: slot,
        }
    }
}

pub struct KeyPools(HashMap<&'static str, KeyPool>);

impl KeyPools {
    pub fn new(
        providers: impl Iterator<Item = &'static str>,
        keys: usize,
        per_key_concurrency: usize,
    ) -> Self {
        Self(
            providers
                .map(|p| (p, KeyPool::new(p, keys, per_key_concurrency)))
                .collect(),
        )
    }

    pub fn get(&self, provider: &str) -> &KeyPool {
        &self.0[provider]
    }
}
