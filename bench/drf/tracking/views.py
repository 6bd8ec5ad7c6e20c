"""The seed's tracking API as Django REST Framework would write it: each hit (or list of
hits) validated by a serializer and saved, with its contexts, in one transaction before
the answer."""
from django.db import transaction
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .models import Access, AccessContext, Site


class UserSerializer(serializers.Serializer):
    id = serializers.CharField(max_length=128)
    device = serializers.CharField(max_length=200, required=False, allow_null=True)


class HitSerializer(serializers.Serializer):
    site_id = serializers.UUIDField()
    url = serializers.URLField(max_length=2000)
    context = serializers.ListField(child=serializers.CharField(max_length=100), max_length=32, required=False)
    user = UserSerializer()


class TrackView(APIView):
    def post(self, request):
        many = isinstance(request.data, list)
        hits = HitSerializer(data=request.data, many=many)
        if not hits.is_valid():
            return Response(hits.errors, status=status.HTTP_422_UNPROCESSABLE_ENTITY)
        items = hits.validated_data if many else [hits.validated_data]
        agent = request.META.get("HTTP_USER_AGENT")
        with transaction.atomic():
            for hit in items:
                if not Site.objects.filter(id=hit["site_id"]).exists():
                    return Response({"detail": "unknown site"}, status=status.HTTP_422_UNPROCESSABLE_ENTITY)
                access = Access.objects.create(
                    site_id=hit["site_id"], url=hit["url"], user_id=hit["user"]["id"],
                    device=hit["user"].get("device"), user_agent=agent,
                )
                AccessContext.objects.bulk_create(
                    [AccessContext(access=access, context=c) for c in hit.get("context", [])]
                )
        return Response({"accepted": len(items)}, status=status.HTTP_202_ACCEPTED)
