//! Real receivers the products deliver to in tests: an SMTP server that keeps what it
//! is sent.

use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// A mail received by the sink.
#[derive(Debug, Clone)]
pub(crate) struct Mail {
    pub recipients: Vec<String>,
    pub data: String,
}

/// An SMTP server that keeps what it is sent: enough of RFC 5321 for lettre.
pub(crate) struct SmtpSink {
    pub port: u16,
    mails: Arc<Mutex<Vec<Mail>>>,
}

impl SmtpSink {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let kept = mails.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(Self::session(conn, kept.clone()));
            }
        });
        Self { port, mails }
    }

    async fn session(conn: TcpStream, mails: Arc<Mutex<Vec<Mail>>>) {
        let (read, mut write) = conn.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut recipients = Vec::new();
        let _ = write.write_all(b"220 sink ESMTP\r\n").await;
        while let Ok(Some(line)) = lines.next_line().await {
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let answer: &[u8] = match verb.as_str() {
                "EHLO" | "HELO" => b"250 sink\r\n",
                "MAIL" => {
                    recipients.clear();
                    b"250 OK\r\n"
                }
                "RCPT" => {
                    let to = line.split(['<', '>']).nth(1).unwrap_or("").to_owned();
                    recipients.push(to);
                    b"250 OK\r\n"
                }
                "DATA" => {
                    let _ = write.write_all(b"354 go on\r\n").await;
                    let mut data = String::new();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if l == "." {
                            break;
                        }
                        data.push_str(&l);
                        data.push('\n');
                    }
                    mails.lock().unwrap().push(Mail {
                        recipients: std::mem::take(&mut recipients),
                        data,
                    });
                    b"250 queued\r\n"
                }
                "QUIT" => {
                    let _ = write.write_all(b"221 bye\r\n").await;
                    return;
                }
                _ => b"250 OK\r\n",
            };
            if write.write_all(answer).await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

/// A webhook post as the receiver got it.
#[derive(Debug, Clone)]
pub(crate) struct Hook {
    /// What it answered.
    pub status: u16,
    pub event: String,
    pub delivery: String,
    pub timestamp: String,
    pub signature: Option<String>,
    pub body: Vec<u8>,
}

/// An HTTP server that keeps every post to `/hook`, answering 500 to the first
/// `failures` of them (a receiver that is down for a while) and 204 after.
pub(crate) struct WebhookSink {
    pub url: String,
    hooks: Arc<Mutex<Vec<Hook>>>,
}

impl WebhookSink {
    pub(crate) async fn start(failures: usize) -> Self {
        use poem::{handler, http::StatusCode, web::Data, EndpointExt, Request, Route};
        type Kept = Arc<Mutex<Vec<Hook>>>;
        #[handler]
        fn hook(req: &Request, body: Vec<u8>, kept: Data<&(Kept, usize)>) -> StatusCode {
            let header = |name: &str| req.header(name).unwrap_or_default().to_owned();
            let mut hooks = kept.0 .0.lock().unwrap();
            let status = if hooks.len() < kept.0 .1 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::NO_CONTENT
            };
            hooks.push(Hook {
                status: status.as_u16(),
                event: header("x-termopar-event"),
                delivery: header("x-termopar-delivery"),
                timestamp: header("x-termopar-timestamp"),
                signature: req.header("x-termopar-signature").map(str::to_owned),
                body,
            });
            status
        }
        let hooks: Kept = Arc::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = Route::new()
            .at("/hook", poem::post(hook))
            .data((hooks.clone(), failures));
        let acceptor = poem::listener::TcpAcceptor::from_std(listener).unwrap();
        tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
        Self { url, hooks }
    }

    pub(crate) fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap().clone()
    }
}
