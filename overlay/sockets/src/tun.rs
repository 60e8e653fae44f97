//! TUN endpoint (todo)
