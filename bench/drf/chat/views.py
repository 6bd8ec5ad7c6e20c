from django.db import IntegrityError, transaction
from datetime import timezone
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .models import Conversation, Message


class DataSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    direction = serializers.ChoiceField(choices=["SENT", "RECEIVED"], required=False)
    content = serializers.CharField(required=False, allow_blank=True)
    conversation_id = serializers.UUIDField(required=False)


class EventSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["NEW_CONVERSATION", "NEW_MESSAGE", "CLOSE_CONVERSATION"])
    timestamp = serializers.DateTimeField(default_timezone=timezone.utc)
    data = DataSerializer()


class WebhookView(APIView):
    def post(self, request):
        event = EventSerializer(data=request.data)
        if not event.is_valid():
            return Response(event.errors, status=status.HTTP_400_BAD_REQUEST)
        kind, ts, data = event.validated_data["type"], event.validated_data["timestamp"], event.validated_data["data"]
        if kind == "NEW_CONVERSATION":
            _, created = Conversation.objects.get_or_create(id=data["id"], defaults={"created_at": ts})
            return Response({"status": "processed" if created else "duplicate"})
        if kind == "CLOSE_CONVERSATION":
            updated = Conversation.objects.filter(id=data["id"], state="OPEN").update(state="CLOSED", closed_at=ts)
            if updated or Conversation.objects.filter(id=data["id"]).exists():
                return Response({"status": "processed" if updated else "duplicate"})
            return Response({"detail": "conversation not found"}, status=status.HTTP_404_NOT_FOUND)
        if "direction" not in data or "content" not in data or "conversation_id" not in data:
            return Response({"detail": "incomplete message"}, status=status.HTTP_400_BAD_REQUEST)
        with transaction.atomic():
            conversation = Conversation.objects.select_for_update().filter(id=data["conversation_id"]).first()
            if conversation is None:
                return Response({"detail": "conversation not found"}, status=status.HTTP_404_NOT_FOUND)
            if conversation.state == "CLOSED":
                return Response({"detail": "conversation closed"}, status=status.HTTP_409_CONFLICT)
            try:
                with transaction.atomic():
                    Message.objects.create(
                        id=data["id"], conversation=conversation, direction=data["direction"],
                        content=data["content"], timestamp=ts,
                    )
            except IntegrityError:
                return Response({"status": "duplicate"})
        return Response({"status": "processed"})
