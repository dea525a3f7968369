//! A fresh PostgreSQL database per test, on the server named by `HARK_TEST_POSTGRES` (default
//! the local one `scripts/test` makes sure runs), dropped when the test ends.

use sqlx::Connection;

use super::DEADLINE;

pub fn server_url() -> String {
    std::env::var("HARK_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database (the last path segment) replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{base}/{name}{query}")
}

async fn admin() -> sqlx::PgConnection {
    let server = server_url();
    match tokio::time::timeout(DEADLINE, sqlx::PgConnection::connect(&server)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "PostgreSQL at {server} is needed by the cluster tests (set HARK_TEST_POSTGRES, or \
             run scripts/test, which starts one): {e}"
        ),
        Err(_) => panic!("PostgreSQL at {server} did not answer within {DEADLINE:?}"),
    }
}

pub struct FreshDb {
    pub name: String,
    pub url: String,
}

impl FreshDb {
    pub async fn create() -> FreshDb {
        let name = format!("hark_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = admin().await;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let _ = conn.close().await;
        FreshDb {
            url: with_database(&server_url(), &name),
            name,
        }
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        // Drop needs no runtime: a thread of its own with a small one.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut c) = sqlx::PgConnection::connect(&server_url()).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut c)
                            .await;
                }
            });
        })
        .join();
    }
}
