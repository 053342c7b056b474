//! Bounded label values: model names come from clients, so the set of values a label may
//! take is capped; later values fold into [`OTHER`], which the exporters count.

use std::collections::HashSet;

/// What a label value becomes once its label has reached its cap.
pub const OTHER: &str = "other";

pub struct LabelCap {
    admitted: HashSet<String>,
    max: usize,
}

impl LabelCap {
    pub fn new(max: usize) -> Self {
        Self {
            admitted: HashSet::new(),
            max,
        }
    }

    /// `Some(value)` if it is already admitted or there is room; `None` once full.
    pub fn admit<'a>(&mut self, value: &'a str) -> Option<&'a str> {
        if self.admitted.contains(value) {
            return Some(value);
        }
        if self.admitted.len() < self.max {
            self.admitted.insert(value.to_owned());
            return Some(value);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_past_the_cap_are_refused() {
        let mut cap = LabelCap::new(2);
        assert_eq!(cap.admit("a"), Some("a"));
        assert_eq!(cap.admit("b"), Some("b"));
        assert_eq!(cap.admit("c"), None);
        assert_eq!(cap.admit("a"), Some("a"));
    }
}
