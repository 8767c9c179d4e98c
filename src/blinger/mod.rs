//! Everything that speaks to Blinger: the typed answers ([`model`]) and the HTTP client
//! ([`client`]).

pub mod client;
pub mod model;

pub use client::{Accepted, Client};
