from django.urls import path

from chat.views import WebhookView

urlpatterns = [path("webhook/", WebhookView.as_view())]
