//! Models: CLIP (the one functional forward every method shares) and the blocks methods put
//! in its MLP slot (WE-MoE).
pub mod clip;
pub mod we_moe;
