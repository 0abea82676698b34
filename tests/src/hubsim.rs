//! Hub simulator: placeholder, being written.
