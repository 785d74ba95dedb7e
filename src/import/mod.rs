//! Importers of other proxies' configurations: `tollgate import-nginx FILE`.

pub mod nginx;
