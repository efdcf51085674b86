//! The test server: its own small crate (`tests/http_server`), which the
//! demo example serves from too.

pub use jobrun_test_server::*;
