from django.urls import path

from chat.views import WebhookView
from tracking.views import TrackView

urlpatterns = [path("webhook/", WebhookView.as_view()), path("track/", TrackView.as_view())]
