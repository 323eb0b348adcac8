//! Values many clients hold alike, kept once: each client holds a pointer to a shared copy
//! (an idle client's bytes count, see benches/idle-memory.sh).

use std::sync::{Arc, Mutex};

/// A bounded list of shared values, looked up by equality.
pub struct Interned<T> {
    list: Mutex<Vec<Arc<T>>>,
    cap: usize,
}

impl<T: PartialEq> Interned<T> {
    pub const fn new(cap: usize) -> Interned<T> {
        Interned {
            list: Mutex::new(Vec::new()),
            cap,
        }
    }

    /// The shared copy equal to `value`, or `value` shared from now on. Past `cap` distinct
    /// values held, a new one is not kept for sharing: its holder gets its own.
    pub fn share(&self, value: T) -> Arc<T> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = list.iter().find(|v| ***v == value) {
            return v.clone();
        }
        // values nobody holds any more make room
        list.retain(|v| Arc::strong_count(v) > 1);
        let value = Arc::new(value);
        if list.len() < self.cap {
            list.push(value.clone());
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_unheld_ones_make_room() {
        let i = Interned::new(2);
        let a = i.share(String::from("a"));
        assert!(Arc::ptr_eq(&a, &i.share(String::from("a"))));
        let b = i.share(String::from("b"));
        // full: a third distinct value is its holder's own
        let c = i.share(String::from("c"));
        assert!(!Arc::ptr_eq(&c, &i.share(String::from("c"))));
        drop(b);
        // b is held by nobody now: c takes its place
        let c2 = i.share(String::from("c"));
        assert!(Arc::ptr_eq(&c2, &i.share(String::from("c"))));
        assert!(Arc::ptr_eq(&a, &i.share(String::from("a"))));
    }
}
