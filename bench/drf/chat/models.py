from django.db import models


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True)
    state = models.CharField(max_length=6, default="OPEN")
    created_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True)


class Message(models.Model):
    id = models.UUIDField(primary_key=True)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    direction = models.CharField(max_length=8)
    content = models.TextField()
    timestamp = models.DateTimeField()
