//! The `meshgate` program's library half: the composition root ([`app`]) that assembles a
//! gateway or a node from its configuration, used by the binary's subcommands and by tests
//! that start either in-process.

pub mod app;
