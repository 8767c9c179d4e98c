//! Everything that speaks to Blinger: the typed answers ([`model`], the `blinger-api` crate the
//! sandbox shares), the HTTP client ([`client`]) and the one table that classifies every answer
//! ([`failure`]).

pub mod client;
pub mod failure;

pub use blinger_api as model;
pub use client::{Accepted, Client};
