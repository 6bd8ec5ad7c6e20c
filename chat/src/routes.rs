//! `/webhook` and `/conversations`: receiving chat events and reading conversations.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::{Binary, Json},
    ApiRequest, Enum, Object, OpenApi,
};
use sqlx::FromRow;
use uuid::Uuid;

use termopar_web::{
    pagination::{Listing, Page, PageParams},
    responses::Found,
    ApiError, ApiResult, BearerAuth,
};

use crate::{
    webhook::{deliver, WebhookAck},
    Chat,
};

/// The chat product's group in the OpenAPI document.
#[derive(poem_openapi::Tags)]
enum ChatTags {
    /// Chat webhook events and conversations.
    Conversations,
}

/// A conversation's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
pub(crate) enum ConversationState {
    /// Accepting messages.
    #[oai(rename = "OPEN")]
    Open,
    /// Closed: new messages are refused.
    #[oai(rename = "CLOSED")]
    Closed,
}

impl ConversationState {
    fn as_str(self) -> &'static str {
        match self {
            ConversationState::Open => "OPEN",
            ConversationState::Closed => "CLOSED",
        }
    }
}

/// A conversation.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct Conversation {
    /// Id (from NEW_CONVERSATION).
    pub id: Uuid,
    /// `OPEN` or `CLOSED`.
    pub state: String,
    /// When it was opened (the event's timestamp).
    pub created_at: DateTime<Utc>,
    /// When it was closed (the event's timestamp); `null` while open.
    pub closed_at: Option<DateTime<Utc>>,
    /// Messages in it.
    pub message_count: i64,
}

/// A message.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct Message {
    /// Id.
    pub id: Uuid,
    /// Its conversation.
    pub conversation_id: Uuid,
    /// `SENT` or `RECEIVED`.
    pub direction: String,
    /// Text.
    pub content: String,
    /// When it was sent (the event's timestamp).
    pub timestamp: DateTime<Utc>,
    /// When termopar received the event.
    pub received_at: DateTime<Utc>,
}

/// A conversation with a page of its messages, in chronological order.
#[derive(Debug, Object)]
pub(crate) struct ConversationDetail {
    #[oai(flatten)]
    conversation: Conversation,
    /// Messages, oldest first.
    messages: Page<Message>,
}

/// A webhook event: `{"type", "timestamp", "data"}`.
#[derive(ApiRequest)]
enum WebhookBody {
    /// NEW_CONVERSATION `{"id"}`, NEW_MESSAGE `{"id","direction","content",
    /// "conversation_id"}` or CLOSE_CONVERSATION `{"id"}` in `data`.
    #[oai(content_type = "application/json")]
    Json(Binary<Vec<u8>>),
}

macro_rules! conversation_columns {
    () => {
        "c.id, c.state, c.created_at, c.closed_at,
         (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
    };
}

/// The webhook receiver and conversation reads.
pub struct ChatApi;

#[OpenApi(tag = "ChatTags::Conversations")]
impl ChatApi {
    /// Receive a chat event (also at `POST /webhook/`).
    ///
    /// Errors say whether a retry can help: 404 `conversation_not_found` (a message
    /// before its conversation: retry later), 409 `conflict` (an id reused by a
    /// different event) or `conversation_closed`, 422 for a malformed event, 503 while
    /// PostgreSQL is down (MongoDB being down only delays the raw copies). A redelivered
    /// event gets 200 `duplicate`. With `WEBHOOK_SECRET` set, `X-Signature:
    /// sha256=<hex HMAC-SHA256 of the body>` is required (401).
    #[oai(path = "/webhook", method = "post", operation_id = "receiveWebhook")]
    #[tracing::instrument(skip_all)]
    async fn receive(
        &self,
        chat: Data<&Chat>,
        req: &poem::Request,
        body: WebhookBody,
    ) -> ApiResult<Found<WebhookAck>> {
        let WebhookBody::Json(Binary(body)) = body;
        Ok(Found::Ok(Json(deliver(&chat, req.headers(), &body).await?)))
    }

    /// List conversations, newest first (admins; also at `GET /conversations`).
    #[oai(
        path = "/conversations",
        method = "get",
        operation_id = "listConversations"
    )]
    #[tracing::instrument(skip_all, fields(state = ?filter.0))]
    async fn list(
        &self,
        chat: Data<&Chat>,
        auth: BearerAuth,
        /// Only conversations in this state.
        #[oai(name = "state")]
        filter: Query<Option<ConversationState>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<Page<Conversation>>> {
        auth.0.require_admin()?;
        let params = PageParams::new(page.0, page_size.0);
        let page = Listing::new(
            "conversations c",
            conversation_columns!(),
            "c.created_at DESC, c.id DESC",
        )
        .text("c.state", filter.0.map(ConversationState::as_str))
        .page::<Conversation, _>(chat.pg(), params)
        .await?;
        Ok(Found::Ok(Json(page)))
    }

    /// A conversation: its state and a page of its messages, oldest first (admins;
    /// also at `GET /conversations/{id}`).
    #[oai(
        path = "/conversations/:id",
        method = "get",
        operation_id = "getConversation"
    )]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        chat: Data<&Chat>,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Page of messages, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Messages per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<ConversationDetail>> {
        auth.0.require_admin()?;
        let params = PageParams::new(page.0, page_size.0);
        let conversation = sqlx::query_as::<_, Conversation>(concat!(
            "SELECT ",
            conversation_columns!(),
            " FROM conversations c WHERE c.id = $1"
        ))
        .bind(id.0)
        .fetch_optional(chat.pg())
        .await?
        .ok_or_else(|| ApiError::not_found("conversation"))?;
        let items = sqlx::query_as::<_, Message>(
            "SELECT id, conversation_id, direction, content, \"timestamp\", received_at
             FROM messages WHERE conversation_id = $1
             ORDER BY \"timestamp\", id LIMIT $2 OFFSET $3",
        )
        .bind(id.0)
        .bind(params.limit())
        .bind(params.offset())
        .fetch_all(chat.pg())
        .await?;
        let total = conversation.message_count;
        Ok(Found::Ok(Json(ConversationDetail {
            conversation,
            messages: params.page(items, total),
        })))
    }
}
