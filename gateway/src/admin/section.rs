//! A section of `/status` that the assembly adds (the fleet's): a leaf, so that the state the
//! connections share can hold one without depending on the status page.

/// Rendered at request time.
pub trait StatusSection: Send + Sync {
    fn json(&self) -> serde_json::Value;
}
