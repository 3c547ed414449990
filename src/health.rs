//! Readiness: each long-running component reports whether it is working and, if not, why.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ComponentState {
    pub ready: bool,
    pub detail: String,
}

#[derive(Clone, Default)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, ComponentState>>>,
    /// Set once shutdown starts: the instance stops being ready so traffic moves elsewhere.
    draining: Arc<AtomicBool>,
}

impl Health {
    pub fn set(&self, component: &str, ready: bool, detail: impl Into<String>) {
        if let Ok(mut map) = self.components.lock() {
            map.insert(
                component.to_owned(),
                ComponentState {
                    ready,
                    detail: detail.into(),
                },
            );
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, ComponentState> {
        self.components
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
