//! Backend health: active checks, passive outlier detection, and the weights they imply.
pub mod probe;
pub mod state;
