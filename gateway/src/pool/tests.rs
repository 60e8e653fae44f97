//! Pool tests on real loopback sockets.
