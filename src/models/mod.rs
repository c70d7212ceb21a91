//! Models: CLIP (the one functional forward every method shares).
pub mod clip;
