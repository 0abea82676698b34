//! Mutual TLS between the agent's processes.
//!
//! The executor runs a private CA for the agent's namespace and issues each component a leaf
//! certificate into a Secret of its own; pods mount only their own Secret as a directory.
//! Every gRPC server requires a client certificate from that CA and checks the caller's
//! identity per method ([`server::Policy`]); every client checks the server's identity.
//!
//! An identity is a DNS subject alternative name `<role>.<namespace>.distr-agent.internal`
//! ([`identity`]). Credentials are loaded from `tls.crt`, `tls.key` and `ca.crt`
//! ([`credentials`]), validated before use, and swapped in whole when the files change
//! ([`reload`]), so rotation never interrupts a call.

pub mod client;
pub mod credentials;
pub mod identity;
pub mod reload;
pub mod server;

pub use credentials::{Credentials, CredentialsWatch, TlsError, TlsFiles};
pub use identity::{PeerIdentity, Role};
