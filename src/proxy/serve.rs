//! An HTTP/1.x request from its header to its record, in place of Pingora's `HttpProxy`
//! (see `listen`): the same steps it takes for a request answered in `request_filter`,
//! with the gateway's stages called directly instead of through boxed hooks. The
//! connection loop then finishes the session and keeps the stream for the next request.

use super::Gateway;
use crate::listen::Serve;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::{ProxyHttp, Session};

impl Serve for Gateway {
    async fn serve(&self, session: &mut Session, shutdown: &ShutdownWatch) -> bool {
        if *shutdown.borrow() {
            // The connection closes after this answer.
            session.set_keepalive(None);
        }
        // What the request held is given back before the connection waits for the next
        // one.
        let mut ctx = self.new_ctx();
        match self.answer(session, &mut ctx).await {
            Ok(()) => {
                self.record(session, None, &mut ctx);
                true
            }
            Err(e) => {
                // As Pingora's proxy ends a request whose filter failed: an error status
                // when no answer started, the error logged, the connection not kept.
                let failed = self.fail_to_proxy(session, &e, &mut ctx).await;
                log::error!(
                    "Fail to filter request: {e}, status: {}, {}",
                    failed.error_code,
                    self.request_summary(session, &ctx)
                );
                self.record(session, Some(&e), &mut ctx);
                session.downstream_session.on_proxy_failure(e);
                false
            }
        }
    }
}
